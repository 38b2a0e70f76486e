"""One optimizer step, as one object: its gradients come from a ``GradientSource`` (this job's ranks over
the whole global batch, or under torchft this replica group's blocks summed with the live groups'), then
the norm, the guards, the update and the step's fingerprints.

The step reads nothing of the trainer: what it needs is handed to it when the trainer is composed, and
the step number comes with each call, so tools (replay, bisect, inspect) run steps through it and move
the state themselves with ``TrainState.advance``. Its one host sync is ``StepResult.read``: loss, grad
norm and the stop flag, agreed by every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from lockstep.data.loader import DataLoader, Microbatch
from lockstep.parallel.canonical import clip_, grad_norm_fp64
from lockstep.parallel.parallelize import BuiltModel
from lockstep.parallel.reducer import CrossRankReducer, any_rank_flag
from lockstep.train.forward_backward import ForwardBackward
from lockstep.train.guards.nonfinite import first_nonfinite_module
from lockstep.train.guards.step_guards import StepGuards
from lockstep.train.observe.fingerprint import ModuleOutputs, model_fingerprint
from lockstep.train.observe.moe_balance import moe_blocks, move_expert_biases
from lockstep.train.observe.sample_losses import SampleLosses, StepPlace, step_sample_losses
from lockstep.train.observe.step_metrics import StepMetrics
from lockstep.train.resilience.fault_tolerance import FaultTolerance
from lockstep.train.state import StepResult


@dataclass
class Gradients:
    """What a gradient source computed for one step: the gradients are on the parameters."""

    loss: torch.Tensor
    microbatches: list[Microbatch]
    global_tokens: int
    samples: int


class GradientSource(Protocol):
    def gradients(self, step: int) -> Gradients | None:
        """Step `step`'s gradients on the parameters, or None when the step was not committed (fault
        tolerance: redone with the next quorum)."""


class GroupPasses:
    """Forward and backward of this rank's microbatches, the gradients summed over the replica group's
    ranks; returns the loss of the group's microbatches (every rank alike)."""

    def __init__(self, forward_backward: ForwardBackward, *, reducer: CrossRankReducer, step_metrics: StepMetrics):
        self.forward_backward = forward_backward
        self.reducer = reducer
        self.step_metrics = step_metrics

    def __call__(self, microbatches: list[Microbatch], global_tokens: int) -> torch.Tensor:
        loss = self.forward_backward.run(microbatches, global_tokens)
        self.step_metrics.compute_done()  # before waiting for the other replicas
        if self.forward_backward.replica_sum is not None:  # started in backward, bucket by bucket
            self.forward_backward.replica_sum.finish()
        return self.reducer.global_loss(loss, self.forward_backward.node_levels)


class LocalGradients:
    """The whole global batch, by this job's ranks."""

    def __init__(self, loader: DataLoader, *, place: StepPlace, passes: GroupPasses, global_batch: int):
        self.loader, self.place, self.passes, self.global_batch = loader, place, passes, global_batch

    def gradients(self, step: int) -> Gradients:
        place = self.place
        microbatches, global_tokens = self.loader.next_step(place.dp_rank, place.dp_degree, place.shard_degree)
        return Gradients(self.passes(microbatches, global_tokens), microbatches, global_tokens, self.global_batch)


class ReplicaGroupGradients:
    """This replica group's blocks of the step, summed with the other live groups' (torchft); None when
    the quorum changed inside the step, which is then redone."""

    def __init__(
        self, fault_tolerance: FaultTolerance, *, loader: DataLoader, place: StepPlace, passes: GroupPasses,
        params: list[torch.nn.Parameter], counters: list[torch.Tensor],
    ) -> None:  # fmt: skip
        self.fault_tolerance, self.loader, self.place, self.passes = fault_tolerance, loader, place, passes
        self.params, self.counters = params, counters

    def _read_blocks(self, blocks: tuple[int, ...], num_blocks: int, step_samples: int | None):
        place = self.place
        return self.loader.next_blocks(
            blocks, num_blocks, place.dp_rank, place.dp_degree, place.shard_degree, step_samples
        )

    def gradients(self, step: int) -> Gradients | None:
        computed = self.fault_tolerance.committed_gradients(
            step, self.loader, self._read_blocks, self.passes, self.params, self.counters
        )
        if computed is None:
            return None
        loss, microbatches, global_tokens = computed
        return Gradients(loss, microbatches, global_tokens, self.fault_tolerance.step_samples)


class TrainStep:
    """One optimizer step over the global batch (see the module docstring)."""

    def __init__(
        self, source: GradientSource, *, model: BuiltModel, forward_backward: ForwardBackward, reducer: CrossRankReducer,
        optimizers: list[torch.optim.Optimizer], lr_schedulers: list, guards: StepGuards, step_metrics: StepMetrics,
        loader: DataLoader, place: StepPlace, max_norm: float, fingerprint_outputs: bool, device: torch.device,
        sample_losses_available: bool,
    ) -> None:  # fmt: skip
        self.source = source
        self.model = model
        self.forward_backward = forward_backward
        self.reducer = reducer
        self.optimizers, self.lr_schedulers = optimizers, lr_schedulers
        self.guards = guards
        self.step_metrics = step_metrics
        self.loader, self.place = loader, place
        self.max_norm = max_norm
        self.fingerprint_outputs = fingerprint_outputs
        """Module-output fingerprints need eager modules (off under compile)."""
        self.device = device
        self.sample_losses_available = sample_losses_available
        self.named_params = [(n, p) for part in model.parts for n, p in part.named_parameters() if p.requires_grad]
        self.moe_blocks = moe_blocks(model.parts)

    def run(
        self, step: int, *, fingerprint: bool = False, observe: Callable[[str, dict], None] | None = None,
        stop_requested: bool = False,
    ) -> StepResult:  # fmt: skip
        """Step `step`: loss and grad norm (fp32 tensors, read once as floats together with the stop
        flag agreed over all ranks), and with `fingerprint` the hashes of the gradients (before
        clipping), of the updated parameters and of every module's output. `observe(what, tensors)`
        (tools such as bisect) sees "gradients" and "parameters" by name."""
        self.step_metrics.begin()
        outputs = ModuleOutputs(self.model.parts) if fingerprint and self.fingerprint_outputs else None
        result = self._run(step, fingerprint, observe, stop_requested)
        if outputs is not None:
            result.local_digests["outputs"] = outputs.close()
        self.step_metrics.end(step)
        return result

    def sample_losses(self, step_start: int) -> SampleLosses | None:
        """Each sample's loss of the global batch starting at `step_start`, with the current weights (all
        ranks call it). None under pipelining with several samples per microbatch, or fault tolerance."""
        if not self.sample_losses_available:
            return None
        return step_sample_losses(self.loader, step_start, self.forward_backward.summed_losses, self.place, self.device)

    def _run(self, step: int, fingerprint: bool, observe, stop_requested: bool) -> StepResult:
        computed = self.source.gradients(step)
        if computed is None:  # not committed: redone with the next quorum, unless asked to stop
            nothing = torch.zeros((), device=self.device)
            result = StepResult(nothing, nothing, committed=False)
            result.read(any_rank_flag(stop_requested, self.device))
            return result
        named_grads = {n: p.grad for n, p in self.named_params if p.grad is not None}
        grad_norm = grad_norm_fp64(named_grads, self.model.param_names, self.reducer.pp_group)
        result = StepResult(computed.loss, grad_norm, samples=computed.samples)
        result.read(any_rank_flag(stop_requested, self.device))
        if fingerprint:
            digests = result.local_digests.setdefault("gradients", {})
            result.fingerprints["grad_fingerprint"] = model_fingerprint(
                named_grads, self.model.param_names, self.reducer.pp_group, digests
            )
        if observe is not None:
            observe("gradients", named_grads)
        start = self.loader.step_start
        if self.guards.skip(
            step, result.loss_value, result.grad_norm_value, list(range(start, start + result.samples)),
            lambda: self._locate_nonfinite(computed), lambda: self.sample_losses(start),
        ):  # fmt: skip
            self._drop_update()  # the parameters stay as they were
        else:
            self._update(named_grads, grad_norm, result)
        if observe is not None:
            observe("parameters", dict(self.named_params))
        if fingerprint:
            digests = result.local_digests.setdefault("parameters", {})
            result.fingerprints["param_fingerprint"] = model_fingerprint(
                dict(self.named_params), self.model.param_names, self.reducer.pp_group, digests
            )
        return result

    def _update(self, named_grads: dict[str, torch.Tensor], grad_norm: torch.Tensor, result: StepResult) -> None:
        if self.max_norm > 0:
            clip_(list(named_grads.values()), grad_norm, self.max_norm)
        for optimizer, scheduler in zip(self.optimizers, self.lr_schedulers, strict=True):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        speed = getattr(self.model.args, "bias_update_speed", 0.0)
        result.moe = move_expert_biases(self.moe_blocks, speed, self.reducer.dp_group)

    def _locate_nonfinite(self, computed: Gradients) -> str:
        """Replay the step's forward and backward with hooks: the first module with a non-finite value."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.model.pipeline is not None:
            return "not located (pipeline parallel)"
        run = lambda: self.forward_backward.run(computed.microbatches, computed.global_tokens)  # noqa: E731
        found = first_nonfinite_module(self.model.parts[0], run)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        return found or "no module output or gradient (the loss or the reduction)"

    def _drop_update(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        for _, moe in self.moe_blocks:  # the skipped step's routing counts move no bias
            moe.tokens_per_expert.zero_()
