"""LaunchEvents, built with no trainer: the line and launch record of a heal, and the outcome and line
of each way a loop ends (finished, stopped and saved, stopped unsaved, a lost lighthouse)."""

import json

import pytest

from lockstep.run.launches import Launch
from lockstep.train.resilience.stop import LaunchEvents, StopOutcome


def _events(tmp_path):
    lines: list[str] = []
    launch = Launch(tmp_path, {"launch": 1})
    return LaunchEvents(lines.append, launch), lines


def test_a_heal_is_printed_and_recorded_in_the_launch(tmp_path):
    events, lines = _events(tmp_path)
    events.healed(7)
    events.healed(9)
    assert lines == [f"healed from a live replica group: continuing after step {s}" for s in (7, 9)]
    assert json.loads((tmp_path / "launch.json").read_text())["healed_at"] == [7, 9]


def test_a_heal_on_a_rank_without_the_launch_record_only_prints():
    lines: list[str] = []
    LaunchEvents(lines.append, None).healed(3)
    assert len(lines) == 1


@pytest.mark.parametrize(
    ("stopping", "saved_step", "reason", "outcome", "line"),
    [
        (False, 10, "", StopOutcome(), None),
        (True, 6, "", StopOutcome(stopped=True, saved=True), "stopped by signal after step 6, saved: rerun to resume"),
        (True, 4, "", StopOutcome(stopped=True), "stopped by signal after step 6; nothing was saved for it"),
        (True, None, "", StopOutcome(stopped=True), "stopped by signal after step 6; nothing was saved for it"),
        (True, 6, "lost", StopOutcome(True, True, "lost"), "stopped after step 6, saved: lost"),
        (True, None, "lost", StopOutcome(True, False, "lost"), "stopped after step 6, nothing saved for it"),
    ],
)
def test_how_the_loop_ended(tmp_path, stopping, saved_step, reason, outcome, line):
    events, lines = _events(tmp_path)
    assert events.stopped(6, stopping=stopping, saved_step=saved_step, reason=reason) == outcome
    if line is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(line)
