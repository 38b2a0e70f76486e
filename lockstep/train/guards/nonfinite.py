"""Find the first module that produced a NaN or Inf, by replaying a step's forward and backward with
hooks on every module (run only after a non-finite loss or gradient was seen)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lockstep.errors import LockstepError


class NonFiniteError(LockstepError, RuntimeError):
    """A NaN/Inf loss or gradient stopped the run (debug.nonfinite = stop, or too many skips in a row).

    A LockstepError, so the CLI prints it as one line and exits 2: the fix is in the settings (a lower
    optimizer.lr, cleaner data, debug.nonfinite = skip), not in lockstep. Still a RuntimeError for
    callers that caught it as one."""


class ConsecutiveSkips:
    """Counts non-finite steps in a row under debug.nonfinite = skip and stops the run at the limit:
    a run that only skips is diverging, and would otherwise log NaN to the end and exit 0."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.first_step: int | None = None
        self.count = 0

    def finite(self) -> None:
        self.first_step, self.count = None, 0

    def skipped(self, step: int, message: str) -> None:
        """Record a skipped step; raises NonFiniteError when it is the limit-th in a row."""
        if self.first_step is None:
            self.first_step = step
        self.count += 1
        if self.count >= self.limit:
            steps = f"step {step} was" if step == self.first_step else f"steps {self.first_step}-{step} were all"
            raise NonFiniteError(
                f"{steps} non-finite and skipped (debug.max_consecutive_skips = "
                f"{self.limit}); last one: {message}; the run is diverging: lower optimizer.lr or raise "
                "lr_scheduler.warmup_steps, check the data, or resume from an earlier checkpoint"
            )


def _finite(value) -> bool:
    tensors = [value] if isinstance(value, torch.Tensor) else [v for v in value if isinstance(v, torch.Tensor)]
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_floating_point() and not torch.isfinite(local).all():
            return False
    return True


def first_nonfinite_module(model: nn.Module, replay: Callable[[], None]) -> str | None:
    """Run `replay` (forward and backward of the step) with hooks; returns "name (Class, forward output)"
    or "name (Class, gradient)" of the first module in execution order with a non-finite value."""
    found: list[str] = []
    handles = []

    def on_forward(name: str):
        def hook(module, args, output):
            if not found and not _finite(output if isinstance(output, tuple) else (output,)):
                found.append(f"{name} ({type(module).__name__}, forward output)")

        return hook

    def on_backward(name: str):
        def hook(module, grad_input, grad_output):
            if not found and not _finite(grad_output):
                found.append(f"{name} ({type(module).__name__}, gradient)")

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(on_forward(name)))
            handles.append(module.register_full_backward_hook(on_backward(name)))
    try:
        with warnings.catch_warnings():  # the embedding's hook sees gradients of outputs only: that is enough
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            replay()
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None
