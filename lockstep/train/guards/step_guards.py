"""Whether a step's update is dropped: the guards that read the step's loss before the optimizer runs.

Built from the ``debug`` section. A NaN/Inf loss or grad norm acts per ``debug.nonfinite`` (stop naming
the first module that produced it, skip, or ignore; too many skips in a row stop the run), and a loss
spike (``debug.spike_window``, lockstep.train.guards.spikes) is recorded and, with ``spike_action = skip``,
dropped. The trainer clears a dropped step's gradients and routing counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from lockstep.config.sections import DebugConfig
from lockstep.train.guards.nonfinite import ConsecutiveSkips, NonFiniteError
from lockstep.train.guards.spikes import SpikeDetector
from lockstep.train.observe.sample_losses import SampleLosses


class StepGuards:
    def __init__(
        self,
        debug: DebugConfig,
        *,
        loss_window: list[float],
        run_folder: Path,
        writes: bool,
        log: Callable[[str], None],
    ) -> None:
        self.nonfinite = debug.nonfinite
        self.consecutive_skips = ConsecutiveSkips(debug.max_consecutive_skips)
        self.spikes = (
            SpikeDetector(debug, window=loss_window, run_folder=run_folder, writes=writes)
            if debug.spike_window
            else None
        )
        self.log = log

    def skip(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        samples: list[int],
        locate_nonfinite: Callable[[], str],
        sample_losses: Callable[[], SampleLosses | None],
    ) -> bool:
        """True when step's update must be dropped. `locate_nonfinite` replays the step to name the first
        non-finite module; `sample_losses` takes each sample's loss (only called on a spike)."""
        return self._nonfinite(step, loss, grad_norm, locate_nonfinite) or self._spike(
            step, loss, samples, sample_losses
        )

    def _nonfinite(self, step: int, loss: float, grad_norm: float, locate: Callable[[], str]) -> bool:
        if self.nonfinite == "ignore" or (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.consecutive_skips.finite()
            return False
        where = " | ".join(line.strip() for line in locate().splitlines() if line.strip())  # one line
        message = f"non-finite loss ({loss}) or grad norm ({grad_norm}) at step {step}; first non-finite value: {where}"
        if self.nonfinite == "stop":
            raise NonFiniteError(message + " (debug.nonfinite = skip would drop such steps)")
        self.consecutive_skips.skipped(step, message)  # raises at debug.max_consecutive_skips in a row
        self.log(f"warning: {message}; step skipped")
        return True

    def _spike(
        self, step: int, loss: float, samples: list[int], sample_losses: Callable[[], SampleLosses | None]
    ) -> bool:
        if self.spikes is None or (spike := self.spikes.check(step, loss)) is None:
            return False
        self.spikes.record(spike, sample_losses(), samples)
        if (shifted := self.spikes.level_shift()) is not None:
            raise NonFiniteError(shifted)  # the same exit as too many non-finite steps: fix the data or settings
        action = "step skipped" if self.spikes.skips else "training on"
        self.log(
            f"warning: loss spike at step {step}: {spike.loss:.4f} is {spike.z_score:.1f} standard deviations above "
            f"the last {self.spikes.size} steps' mean {spike.window_mean:.4f}; recorded in spikes.jsonl; {action}"
        )
        return self.spikes.skips
