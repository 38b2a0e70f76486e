"""lockstep.data.interleave: the interleaving of a mixture's sources keeps every prefix of a period within
one sample of its quota, and the per-period counts are the exact weights (or within one millionth), so a
mixture's proportions hold over any short window of steps."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import numpy as np

from lockstep.data.interleave import MAX_PERIOD, interleave, period_counts


def test_interleave_has_the_quota_property_for_every_prefix():
    """Exhaustively for 2-4 sources with 1-6 samples per period (and 200 random larger cases): after n
    samples of the period, source i has served floor(n c_i / Q) or ceil(n c_i / Q), and the period is
    exact. So every window of L samples is within 2 of L w_i, and exact when L is a multiple of Q."""
    rng = random.Random(0)
    cases = [c for m in (2, 3, 4) for c in itertools.product(range(1, 7), repeat=m)]
    cases += [[rng.randint(1, 60) for _ in range(rng.randint(2, 8))] for _ in range(200)]
    for counts in cases:
        layout = interleave(list(counts))
        period = layout.period
        served = np.cumsum(np.eye(len(counts), dtype=np.int64)[layout.sources], axis=0)  # [Q, sources]
        n = np.arange(1, period + 1)[:, None]
        c = np.asarray(counts)[None, :]
        assert ((n * c) // period <= served).all() and (served <= -(-(n * c) // period)).all(), counts
        assert served[-1].tolist() == list(counts)
        for i in range(len(counts)):  # ranks number each source's positions 0, 1, 2, ... in order
            assert layout.ranks[layout.sources == i].tolist() == list(range(counts[i]))


def test_period_counts_are_the_exact_weights_or_within_one_millionth():
    assert period_counts([Fraction("0.7"), Fraction("0.3")]) == [7, 3]
    assert period_counts([Fraction(1), Fraction(1), Fraction(1)]) == [1, 1, 1]  # normalised: thirds, exactly
    assert period_counts([Fraction(7), Fraction(3)]) == [7, 3]
    weights = [Fraction("0.1234567"), Fraction("0.3"), Fraction("0.5765433")]  # exact only at Q = 10^7
    counts = period_counts(weights)
    assert sum(counts) == MAX_PERIOD
    assert all(abs(Fraction(c, MAX_PERIOD) - w) < Fraction(1, MAX_PERIOD) for c, w in zip(counts, weights, strict=True))
