"""Play one rank of a large job on this CPU: a fake process group of the job's world size, the model
built on the meta device by ``build_model`` (the trainer's parallelize order, reductions and AC), then
materialised as fake tensors, and one training step run through the trainer's own step pieces
(``RankStep``) under torch's ``MemTracker`` and lockstep's ``WireCounter``.

Fake tensors carry shapes and dtypes but no data, and the fake process group completes every
collective at once, so the step costs seconds whatever the model's size, and every allocation and
every collective call is the real code's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fsdp_param_group
from torch.distributed.pipelining._utils import _StageBackwardMeta
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lockstep.config import JobConfig
from lockstep.config.job import ParallelDims
from lockstep.config.sections import MULTI_STAGE_SCHEDULES, ParallelismConfig
from lockstep.parallel.canonical import local_tensor
from lockstep.parallel.expert_parallel import SourceWeight
from lockstep.parallel.mesh import AXES
from lockstep.tools.estimate.memory import StorageTracker
from lockstep.tools.estimate.rank_step import RankStep
from lockstep.tools.estimate.wire import Traffic, WireCounter
from lockstep.tools.scale.mirror import clear_sharding_caches


@dataclass
class RankTrace:
    rank: int
    stage: int
    peaks: dict[str, dict[str, int]]
    """Per window of the step (StorageTracker.peaks: forward, backward, each gradient reduction kind,
    optimizer), the bytes per term at that window's peak."""
    traffic: Traffic
    as_ring: Traffic
    """The same step with the all-to-all reductions counted as rings (WireCounter.as_ring)."""
    local_params: int
    """This rank's parameter elements (its shards)."""


def rank_coordinates(dims: ParallelDims, rank: int) -> dict[str, int]:
    """The mesh coordinates of a global rank (axes outermost first, as build_mesh lays them out)."""
    coords, rest = {}, rank
    for axis, size in reversed(list(zip(AXES, dims.sizes(), strict=True))):
        coords[axis], rest = rest % size, rest // size
    return coords


def traceable(parallelism: ParallelismConfig) -> bool:
    """Stages are traced one after another, each from the shapes the one before sent it: a schedule that
    runs several stages per rank would need a later stage's shapes first."""
    return parallelism.pipeline_parallel_degree == 1 or parallelism.pipeline_parallel_schedule not in (
        MULTI_STAGE_SCHEDULES
    )


def stage_ranks(dims: ParallelDims) -> list[int]:
    """The worst rank of each pipeline stage: the first of its ranks, which holds the largest shards
    (torch.chunk gives the first shards the extra rows)."""
    per_stage = dims.world_size // dims.pp
    return [stage * per_stage for stage in range(dims.pp)]


class PipelineMailbox:
    """What pipeline stages send each other as Python objects (the shapes of their activations, before
    the first step): a fake process group delivers nothing, so the estimate keeps the objects a traced
    stage sent, for the stage traced after it. A stage's gradients from the next stage (not traced yet)
    have the shapes of what it sent that stage."""

    def __init__(self) -> None:
        self._letters: dict[tuple[int, int], list[list]] = {}
        self._sent: dict[tuple[int, int], list] = {}

    @contextlib.contextmanager
    def delivering(self, rank: int):
        send, recv = dist.send_object_list, dist.recv_object_list

        def send_object_list(object_list, dst=None, group=None, device=None, group_dst=None, **kwargs):
            target = dst if group_dst is None else dist.get_global_rank(group, group_dst)
            self._letters.setdefault((rank, target), []).append(list(object_list))
            self._sent[(rank, target)] = list(object_list)

        def recv_object_list(object_list, src=None, group=None, device=None, group_src=None, **kwargs):
            source = src if group_src is None else dist.get_global_rank(group, group_src)
            letters = self._letters.get((source, rank))
            if not letters and (rank, source) in self._sent:  # the next stage's input gradients, not traced yet
                forward = self._sent[(rank, source)][0]
                object_list[:] = [_StageBackwardMeta(backward_metas=tuple(forward.forward_metas))]
                return
            if not letters:  # estimate() lets through only schedules whose stages come in order (traceable)
                raise RuntimeError(f"stage metadata from rank {source} to rank {rank} was never traced")
            object_list[:] = letters.pop(0)

        dist.send_object_list, dist.recv_object_list = send_object_list, recv_object_list
        try:
            yield
        finally:
            dist.send_object_list, dist.recv_object_list = send, recv


@contextlib.contextmanager
def fake_world(rank: int, world_size: int):
    """A fake process group of `world_size` in which this process is `rank`. DTensor caches its sharding
    decisions by mesh, and meshes of two worlds compare equal while their groups differ: the caches are
    cleared on the way in and out, so no rank sees another's groups."""
    clear_sharding_caches()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        clear_sharding_caches()


def trace_rank(
    config: JobConfig,
    dims: ParallelDims,
    *,
    rank: int,
    ranks_per_node: int,
    vocab_size: int,
    attention_backend: str,
    mailbox: PipelineMailbox | None = None,
) -> RankTrace:
    """Run `rank`'s step of the job on fake tensors; memory and traffic of that rank. Pipeline stages
    are traced in stage order with one `mailbox`: each stage reads the shapes the one before sent it."""
    mailbox = mailbox or PipelineMailbox()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = StorageTracker()
    with fake_world(rank, dims.world_size), mailbox.delivering(rank):
        step = RankStep(
            config, dims, vocab_size=vocab_size, device=torch.device("cpu"), attention_backend=attention_backend,
            ranks_per_node=ranks_per_node, tensor_mode=fake, on_gradient=lambda param: tracker.mark([param.grad], "gradients"),
        )  # fmt: skip
        with fake, _RealStaysReal():
            step.create_optimizer_state()
        counter = WireCounter(rank, ranks_per_node)
        with fake, _RealStaysReal(), tracker, counter, _labelled(step, tracker):
            tracker.mark((p for _, p in step.named_params), "parameters")
            tracker.mark((b for part in step.model.parts for b in part.buffers()), "buffers")
            tracker.mark(step.optimizer_state(), "optimizer")
            step.run(optimizer_phase=lambda: tracker.phase_of("optimizer"))
        local_params = sum(local_tensor(p).numel() for _, p in step.named_params)
        return RankTrace(
            rank=rank, stage=rank_coordinates(dims, rank)["pp"], peaks=tracker.peaks, traffic=counter.traffic,
            as_ring=counter.as_ring, local_params=local_params,
        )  # fmt: skip


@contextlib.contextmanager
def _labelled(step: RankStep, tracker: StorageTracker):
    """Name what the step allocates where it is allocated: FSDP's all-gathers and reductions, attention,
    the routed experts, the output projection and the loss."""
    with contextlib.ExitStack() as stack:
        for name, term in _FSDP_LABELS.items():
            original = getattr(fsdp_param_group, name)
            labelled = tracker.labelled(original, term)
            if name == "foreach_reduce":
                labelled = _reduce_window(labelled, tracker)
            setattr(fsdp_param_group, name, labelled)
            stack.callback(setattr, fsdp_param_group, name, original)
        for part in step.model.parts:
            for module_name, module in part.named_modules():
                leaf = module_name.rsplit(".", 1)[-1]
                if leaf == "attention" or (leaf == "output" and isinstance(module, torch.nn.Linear)):
                    _label_forward(module, tracker, "attention" if leaf == "attention" else "logits_and_loss", stack)
                if leaf == "experts" and hasattr(module, "compute"):
                    original = module.compute
                    module.compute = tracker.labelled(original, "routed_experts")
                    stack.callback(setattr, module, "compute", original)
        original_source = SourceWeight.backward  # the per-source expert gradients, added into their tree
        SourceWeight.backward = staticmethod(tracker.labelled(original_source, "routed_experts"))
        stack.callback(setattr, SourceWeight, "backward", staticmethod(original_source))
        if step.replica_sum is not None:  # the replicate axis's buckets
            for name in ("_launch", "_launch_nodes", "finish"):
                original = getattr(step.replica_sum, name)
                setattr(step.replica_sum, name, tracker.labelled(original, "reduction_buffers"))
                stack.callback(setattr, step.replica_sum, name, original)
        settings = step.forward_backward.settings
        for holder in (settings, settings.pipeline_loss):
            original = holder.loss_fn
            holder.loss_fn = tracker.labelled(original, "logits_and_loss")
            stack.callback(setattr, holder, "loss_fn", original)
        yield


_FSDP_LABELS = {
    "foreach_all_gather": "unsharded_parameters",
    "foreach_all_gather_copy_out": "unsharded_parameters",
    "foreach_reduce": "reduction_buffers",
}


def _reduce_window(reduce, tracker: StorageTracker):
    """Each FSDP gradient reduction is a window of its own: a block's (the first one in backward meets the
    most saved activations) or the root's (embedding and output, at the end of backward)."""

    def call(fsdp_params, *args, **kwargs):
        unit = "block" if fsdp_params and (fsdp_params[0]._param_fqn or "").startswith("layers.") else "root"
        with tracker.window(f"reduce_{unit}"):
            return reduce(fsdp_params, *args, **kwargs)

    return call


def _label_forward(module: torch.nn.Module, tracker: StorageTracker, term: str, stack: contextlib.ExitStack) -> None:
    labels: list[contextlib.AbstractContextManager] = []

    def enter(*_):
        labels.append(tracker.label(term))
        labels[-1].__enter__()

    def leave(*_):
        labels.pop().__exit__(None, None, None)

    stack.callback(module.register_forward_pre_hook(enter).remove)
    stack.callback(module.register_forward_hook(leave).remove)


class _RealStaysReal(TorchDispatchMode):
    """Index arithmetic stays real: an op on real tensors only (a DeviceMesh's rank table), or one that
    makes a small or an integer tensor from nothing (DTensor's shard offsets; the balanced routing's
    expert indices, whose counts expert parallelism reads as Python ints), runs for real. Everything
    else, the model's floating-point allocations included, stays fake."""

    SMALL = 4096

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is torch.ops.aten._grouped_mm.default and args[0].dtype == torch.float32:
            return _fp32_grouped_mm(func, args, kwargs)
        out = func(*args, **kwargs)
        small = isinstance(out, FakeTensor) and (out.numel() <= self.SMALL or not out.is_floating_point())
        if not tensors and small:
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return out


def _fp32_grouped_mm(func, args, kwargs) -> torch.Tensor:
    """CPU runs torch._grouped_mm in fp32 (lockstep's fp32 experts), but its fake kernel takes bf16 only:
    the same shapes in bf16, the result as fp32."""
    as_bf16 = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    return func(*as_bf16, **kwargs).to(torch.float32)
