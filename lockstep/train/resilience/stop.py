"""How a launch ends early or continues after a heal, told to the console and to the launch record.

A step hook beside the loop. Its contract, as every observer's: no collective (what it reports, the
agreed stop flag and the step, is the same on every rank already), and it holds no reference to the
trainer: only a function that prints a line and this launch's record (rank 0's; None elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lockstep.run.launches import Launch


@dataclass(frozen=True)
class StopOutcome:
    """How the loop ended: the CLI exits 75 (stopped, saved), 76 (stopped, unsaved) or 0 (finished)."""

    stopped: bool = False
    """Stopped before training.steps (SIGTERM/SIGINT/SIGHUP, or a lost lighthouse)."""
    saved: bool = False
    """Stopped with the last step saved."""
    reason: str = ""
    """Why, when no signal asked for the stop (a lost fault-tolerance lighthouse)."""


class LaunchEvents:
    """Reports a heal and an early stop: one console line each, and the heal in launches/NNN."""

    def __init__(self, print_line: Callable[[str], None], launch: Launch | None) -> None:
        self.print_line = print_line
        self.launch = launch

    def healed(self, step: int) -> None:
        """Fault tolerance replaced this group's state by a live group's, which had reached `step`."""
        self.print_line(f"healed from a live replica group: continuing after step {step}")
        if self.launch is not None:
            self.launch.healed(step)

    def stopped(self, step: int, *, stopping: bool, saved_step: int | None, reason: str) -> StopOutcome:
        """The loop ended after `step`; `stopping` when it ended early, `saved_step` the last step saved."""
        outcome = StopOutcome(stopped=stopping, saved=stopping and saved_step == step, reason=reason)
        if reason:
            saved = "saved" if outcome.saved else "nothing saved for it (checkpointing is off)"
            self.print_line(f"stopped after step {step}, {saved}: {reason}")
        elif outcome.saved:
            self.print_line(f"stopped by signal after step {step}, saved: rerun to resume")
        elif stopping:
            self.print_line(
                f"stopped by signal after step {step}; nothing was saved for it (checkpointing "
                "is off): a rerun starts over, from the last saved step if there is one"
            )
        return outcome
