"""Which source serves global sample g of a mixture: a fixed, exact interleaving of the weights.

The weights become integer counts c_i per period of Q = sum(c_i) samples: the smallest Q at which the
normalised weights are exact (0.7/0.3 gives 7 and 3 in 10; 1:1:1 gives 1, 1, 1 in 3), or, when that
would pass 1 / SMALLEST_SHARE (a million), counts at that Q by largest remainders (each share then
within 1e-6 of its weight). Sample g lies at position g % Q of period g // Q; every period is laid out
the same way, so the source of g depends on g alone (and the weights), never on the seed, the layout or
what was read before.

The layout has the quota property: after the first n samples of a period, source i has served
floor(n c_i / Q) or ceil(n c_i / Q) of them. It is built by earliest-deadline-first over unit jobs:
source i's j-th sample may take positions floor(j Q / c_i) .. ceil((j+1) Q / c_i) - 1 (exactly those
keep both quota bounds), and at each position the released job with the earliest deadline goes first.
A schedule meeting every such window exists (Tijdeman, "The chairman assignment problem", 1980) and EDF
finds one whenever one exists, so no deadline is missed. Consequences, over the infinite sequence
(whole periods are exact):

* every prefix of n samples has |count_i - n w_i| < 1;
* every window of L consecutive samples has |count_i - L w_i| < 2;
* every window whose length is a multiple of Q has exactly L w_i samples of source i, wherever it starts
  (the sequence is Q-periodic); with a global batch that is a multiple of Q, every step is exact.

Positions are deliberately not shuffled within a period: that would break the prefix bound. What varies
with the seed is which window of a source serves it (lockstep.data.mixture). Memory is O(Q).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from lockstep.config.mixture import SMALLEST_SHARE

MAX_PERIOD = int(1 / SMALLEST_SHARE)


def period_counts(weights: list[Fraction]) -> list[int]:
    """Integer samples per period for each weight (see the module docstring); every count is >= 1 when each
    weight is at least SMALLEST_SHARE of the total (lockstep.config.mixture checks it)."""
    total = sum(weights, Fraction(0))
    shares = [w / total for w in weights]
    period = math.lcm(*(s.denominator for s in shares))
    if period <= MAX_PERIOD:
        return [int(s * period) for s in shares]
    exact = [s * MAX_PERIOD for s in shares]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: MAX_PERIOD - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class Interleave:
    counts: tuple[int, ...]
    """Samples of each source per period."""
    sources: np.ndarray
    """int32 [Q]: the source at each position of the period."""
    ranks: np.ndarray
    """int32 [Q]: how many earlier positions of the period serve the same source."""

    @property
    def period(self) -> int:
        return len(self.sources)

    def locate(self, global_samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, k) per global sample: it is source's k-th sample (k counts from the run's start)."""
        periods, positions = np.divmod(np.asarray(global_samples, dtype=np.int64), self.period)
        sources = self.sources[positions]
        return sources, periods * np.asarray(self.counts, dtype=np.int64)[sources] + self.ranks[positions].astype(
            np.int64
        )


def interleave(counts: list[int]) -> Interleave:
    """The period's layout for these counts, by earliest deadline first (module docstring)."""
    if not counts or min(counts) < 1:
        raise ValueError(f"every source needs a count >= 1 per period; got {counts}")
    period = sum(counts)
    served = [0] * len(counts)
    released: list[tuple[int, int]] = []  # (deadline, source) of each source's next sample, once released
    waiting = [(0, i) for i in range(len(counts))]  # (release, source); already a heap
    sources = np.empty(period, dtype=np.int32)
    ranks = np.empty(period, dtype=np.int32)
    for position in range(period):
        while waiting and waiting[0][0] <= position:
            _, i = heapq.heappop(waiting)
            heapq.heappush(released, (-(-(served[i] + 1) * period // counts[i]) - 1, i))
        deadline, i = heapq.heappop(released)
        assert deadline >= position, "EDF missed a deadline: the quota property would not hold"
        sources[position], ranks[position] = i, served[i]
        served[i] += 1
        if served[i] < counts[i]:
            heapq.heappush(waiting, (served[i] * period // counts[i], i))
    return Interleave(tuple(counts), sources, ranks)
