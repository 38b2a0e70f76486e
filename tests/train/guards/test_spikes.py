"""The spike detector alone: z-scores against a window of ordinary losses, a level shift is not a spike
train, a resumed run with a smaller window keeps working."""

import random

import pytest

from lockstep.config.sections import DebugConfig
from lockstep.train.guards.spikes import SpikeDetector


def _detector(window: list[float], action: str = "log", size: int = 8) -> SpikeDetector:
    debug = DebugConfig(spike_window=size, spike_threshold=6.0, spike_action=action, max_consecutive_skips=5)
    return SpikeDetector(debug, window=window, run_folder=None, writes=False)


def _noisy(rng: random.Random, level: float) -> float:
    return level + rng.gauss(0, 0.01)


def test_a_spike_is_flagged_and_kept_out_of_the_window():
    rng, detector = random.Random(0), _detector([])
    assert [detector.check(s, _noisy(rng, 3.0)) for s in range(1, 21)] == [None] * 20
    before = list(detector.window)
    spike = detector.check(21, 4.0)
    assert spike is not None and spike.step == 21 and spike.z_score > 6 and detector.window == before
    assert detector.check(22, _noisy(rng, 3.0)) is None and detector.window[-1] != 4.0


def test_a_level_shift_stops_skipping_and_restarts_logging():
    rng = random.Random(1)
    for action in ("skip", "log"):
        detector = _detector([], action)
        for s in range(1, 21):
            detector.check(s, _noisy(rng, 3.0))
        messages = []
        for s in range(21, 26):  # the loss moves to 3.3 for good
            assert detector.check(s, _noisy(rng, 3.3)) is not None
            messages.append(detector.level_shift())
        if action == "skip":  # the fifth skip in a row stops the run instead of dropping every later step
            assert messages[:4] == [None] * 4 and "steps 21-25 were all loss spikes" in messages[4]
        else:  # logging starts a new window at the new level, and detection goes on against it
            assert messages == [None] * 5 and detector.window == []
            assert [detector.check(s, _noisy(rng, 3.3)) for s in range(26, 40)] == [None] * 14


@pytest.mark.parametrize("saved", [12, 3])
def test_a_resumed_window_of_another_size_still_detects(saved):
    rng = random.Random(2)
    detector = _detector([_noisy(rng, 3.0) for _ in range(saved)], size=4)
    assert len(detector.window) == min(saved, 4)
    for s in range(10):
        detector.check(s, _noisy(rng, 3.0))
    assert len(detector.window) == 4 and detector.check(99, 5.0) is not None
