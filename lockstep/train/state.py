"""What one training step carries between the trainer's parts: the train state (checkpointed), the step's
result, and the graceful stop on SIGTERM/Ctrl-C."""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass, field

import torch

from lockstep.train.observe.moe_balance import MoEStats


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    """Training time, summed over the run's launches (time-to-target-loss): each launch adds the seconds from
    the start of its first step to the end of its latest committed step, evaluations and saves between steps
    included, start-up not (lockstep.wall_clock's wall_s counts that). A launch continues from the value in
    the checkpoint it resumed, so time after that checkpoint in the stopped launch is not counted."""
    loss_window: list[float] = field(default_factory=list)
    """The spike detector's window of recent ordinary losses (lockstep.train.guards.spikes)."""

    def advance(self, tokens: int, elapsed_s: float | None = None) -> None:
        """One committed step of `tokens` tokens: the one place that moves the step, the tokens seen and
        (given the run's clock) the elapsed time, for the trainer and for tools that step a trainer."""
        self.step += 1
        self.tokens_seen += tokens
        if elapsed_s is not None:
            self.elapsed_s = elapsed_s

    def state_dict(self) -> dict:
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed_s,
            "loss_window": list(self.loss_window),
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.loss_window[:] = [float(x) for x in state.get("loss_window", [])]  # the detector holds this list


@dataclass
class StepResult:
    loss: torch.Tensor
    grad_norm: torch.Tensor
    fingerprints: dict[str, str] = field(default_factory=dict)
    local_digests: dict[str, dict[str, str]] = field(default_factory=dict)
    """With fingerprints: this rank's part of each gradient's and parameter's digest, by name."""
    moe: MoEStats | None = None
    """This rank's MoE load statistics, on the device (read on logged steps only)."""
    loss_value: float = math.nan
    grad_norm_value: float = math.nan
    stop: bool = False
    """Some rank asked to stop (SIGTERM/Ctrl-C): every rank stops after this step."""
    samples: int = 0
    """Samples the step trained on (the global batch, unless fault tolerance shrank it)."""
    committed: bool = True
    """False when fault tolerance voted the step down (a replica group failed in it): nothing was
    updated and the step is redone."""

    def read(self, stop_flag: torch.Tensor) -> None:
        """The step's one device-to-host read: loss, grad norm and the agreed stop flag together
        (fp32 values are exact in fp64)."""
        values = torch.stack([self.loss.double(), self.grad_norm.double(), stop_flag.double()]).tolist()
        self.loss_value, self.grad_norm_value, self.stop = values[0], values[1], values[2] > 0


class GracefulStop:
    """SIGTERM, SIGHUP (a closed terminal, a lost ssh session) or a first Ctrl-C asks the loop to stop
    after the current step (metrics flushed, the stop checkpoint saved); a second Ctrl-C interrupts at
    once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
