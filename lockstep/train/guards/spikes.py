"""Loss-spike detection: which step, and which of its samples, made the loss jump.

A step's loss is compared with the window of the last ``debug.spike_window`` ordinary steps (spikes
and non-finite steps stay out of it, so one spike does not hide the next): its z-score is
(loss - mean) / standard deviation. Above ``debug.spike_threshold`` the step is a spike, and
``spikes.jsonl`` in the run folder records the step, the loss, the z-score, the window's mean and
deviation, the step's global sample indices and each sample's loss (lockstep.train.observe.sample_losses),
so ``lockstep inspect RUN --step N`` can show the culprit documents.

With ``spike_action = log`` the run trains on, bitwise as without detection: the decision reads the
loss the step reads anyway, and the per-sample forward disturbs nothing. With ``skip`` the step's
update is dropped, as for a non-finite loss (the learning-rate schedule does not advance either).
``debug.max_consecutive_skips`` spikes in a row mean the loss moved to a new level: under skip the run
stops with one line (it would otherwise drop every later step), under log the window starts over.
The window is part of the train state, so a resumed run makes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from lockstep.config.sections import DebugConfig
from lockstep.run.jsonl import JsonlWriter
from lockstep.train.observe.sample_losses import SampleLosses

SPIKES_FILE = "spikes.jsonl"


@dataclass
class Spike:
    step: int
    loss: float
    z_score: float
    window_mean: float
    window_std: float


class SpikeDetector:
    def __init__(self, debug: DebugConfig, *, window: list[float], run_folder: Path, writes: bool) -> None:
        self.size = debug.spike_window
        self.threshold = debug.spike_threshold
        self.skips = debug.spike_action == "skip"
        self.window = window
        """The last ordinary losses, oldest first: the train state's list (checkpointed with it)."""
        del self.window[: max(0, len(self.window) - self.size)]  # a resume with a smaller spike_window
        self.limit = debug.max_consecutive_skips
        self.streak: list[int] = []
        """Steps of the current run of spikes in a row."""
        self.path = run_folder / SPIKES_FILE if writes else None

    def check(self, step: int, loss: float) -> Spike | None:
        """Whether `loss` is a spike; an ordinary finite loss joins the window."""
        if not math.isfinite(loss):
            return None
        if len(self.window) == self.size:
            mean = math.fsum(self.window) / self.size
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.window) / self.size)
            z = (loss - mean) / std if std > 0 else (math.inf if loss > mean else 0.0)
            if z > self.threshold:
                self.streak.append(step)
                return Spike(step, loss, z, mean, std)
            del self.window[0]
        self.streak = []
        self.window.append(loss)
        return None

    def level_shift(self) -> str | None:
        """After debug.max_consecutive_skips spikes in a row the loss has moved, not spiked: under skip
        the run would drop every step from here on. Returns the message then; under log the window
        restarts from the next steps (so detection goes on against the new level)."""
        if len(self.streak) < self.limit:
            return None
        steps = f"steps {self.streak[0]}-{self.streak[-1]}"
        self.streak = []
        if not self.skips:
            self.window.clear()
            return None
        return (
            f"{steps} were all loss spikes and skipped (debug.max_consecutive_skips = {self.limit}): the loss has "
            "shifted to a new level rather than spiked, and skipping would drop every step from here on; check the "
            "data at those steps (lockstep inspect), raise debug.spike_threshold, or use debug.spike_action = log"
        )

    def record(self, spike: Spike, losses: SampleLosses | None, samples: list[int]) -> None:
        """Append the spike to spikes.jsonl (rank 0), with the step's samples and their losses."""
        if self.path is None:
            return
        entry = asdict(spike) | {"action": "skip" if self.skips else "log", "samples": samples}
        if losses is not None:
            entry |= {"sample_losses": losses.mean(), "sample_tokens": losses.tokens}
        else:
            entry["sample_losses"] = None  # samples share a pipeline microbatch, or a replica group's blocks
        JsonlWriter(self.path, strict=True).append(entry)
