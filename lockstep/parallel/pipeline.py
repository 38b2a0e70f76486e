"""Pipeline parallelism: split any decoder into stages and drive them with a torch.distributed.pipelining
schedule.

A decoder qualifies if it has ``tok_embeddings``, a ``layers`` ModuleDict, ``norm`` and ``output``, and
its forward skips whichever of those is None (so a stage is the same class with parts removed and
unchanged parameter names: seeded initialisation and checkpoints see the same names in any layout).
The schedule never scales gradients (``scale_grads=False``): the loss is already divided by the
global token count.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from lockstep.config.errors import ConfigError
from lockstep.config.sections import SINGLE_STAGE_SCHEDULES, ParallelismConfig
from lockstep.models.common.moe import token_counting_paused

V_SHAPED_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


@dataclass
class Pipeline:
    schedule: object
    model_parts: list[nn.Module]
    """This rank's stages, in stage order."""
    has_first_stage: bool
    has_last_stage: bool
    num_microbatches: int


def stage_layer_ranges(layer_names: list[str], num_stages: int, split_points: list[str]) -> list[list[str]]:
    """The block names of each stage: an even split (earlier stages take the remainder), or cut
    before each "layers.<name>" in split_points."""
    if split_points:
        cuts = []
        for point in split_points:
            name = point.removeprefix("layers.")
            if name not in layer_names:
                raise ConfigError("parallelism.pipeline_parallel_split_points", f"no layer {point!r} in the model")
            cuts.append(layer_names.index(name))
        if len(cuts) != num_stages - 1 or cuts != sorted(set(cuts)) or cuts[0] == 0:
            raise ConfigError(
                "parallelism.pipeline_parallel_split_points",
                f"need {num_stages - 1} increasing split points after layers.{layer_names[0]} for {num_stages} "
                f"stages; got {split_points}",
            )
        bounds = [0, *cuts, len(layer_names)]
        return [layer_names[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    if len(layer_names) < num_stages:
        raise ConfigError(
            "parallelism.pipeline_parallel_degree",
            f"{num_stages} pipeline stages but the model has only {len(layer_names)} layers; "
            "use fewer stages or a deeper flavor",
        )
    base, extra = divmod(len(layer_names), num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        size = base + (1 if stage < extra else 0)
        ranges.append(layer_names[start : start + size])
        start += size
    return ranges


def stages_of_rank(pp_rank: int, pp_degree: int, schedule_name: str) -> list[int]:
    if schedule_name in SINGLE_STAGE_SCHEDULES:
        return [pp_rank]
    if schedule_name in V_SHAPED_SCHEDULES:
        return [pp_rank, 2 * pp_degree - 1 - pp_rank]
    return [pp_rank, pp_rank + pp_degree]  # looped/interleaved


def stage_module(model: nn.Module, layers: list[str], first: bool, last: bool) -> nn.Module:
    """A copy of the (meta-device) model holding only `layers`, plus the embedding on the first stage
    and the final norm and output on the last."""
    stage = copy.deepcopy(model)
    for name in list(stage.layers):
        if name not in layers:
            del stage.layers[name]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
    return stage


def _without_side_effects_in_metadata_inference(stage: PipelineStage) -> None:
    """Before its first step a stage runs its module once (on sample data) to infer shapes; routed-token
    counts of MoE blocks (which move the router bias) must not see that pass."""
    for name in ("_forward_metadata_inference", "_backward_metadata_inference"):
        method = getattr(stage, name, None)
        if method is None:
            continue

        def paused(*args, _method=method, **kwargs):
            with token_counting_paused():
                return _method(*args, **kwargs)

        setattr(stage, name, paused)


_FSDP_SYNC_SETTERS = ("set_is_last_backward", "set_reshard_after_backward", "set_requires_gradient_sync")


@contextlib.contextmanager
def _fsdp_flags_fixed(module: FSDPModule):
    """Ignore the stage's own calls to FSDP's sync setters on `module` (it turns sync off for every
    backward but the schedule's last) while the block runs."""
    for name in _FSDP_SYNC_SETTERS:
        setattr(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name in _FSDP_SYNC_SETTERS:
            delattr(module, name)


def _reduce_scatter_every_microbatch(stage: PipelineStage) -> None:
    """Make an FSDP stage reduce-scatter every microbatch's gradients during its backward, as FSDP does
    without pipelining, instead of accumulating unsharded gradients until the schedule's final
    reduce. The canonical gradient tree can then be kept on the shards (1/dp_shard of the stage's
    gradients per rank, not unsharded copies); the schedule's closing reduce finds nothing left to
    reduce-scatter. Parameters stay gathered between microbatches (no reshard after backward)."""
    backward = stage.backward_maybe_with_nosync
    if not isinstance(stage.submod, FSDPModule):
        return

    def synced(*args, **kwargs):
        stage.submod.set_is_last_backward(True)
        stage.submod.set_reshard_after_backward(False)
        stage.submod.set_requires_gradient_sync(True)
        with _fsdp_flags_fixed(stage.submod):
            return backward(*args, **kwargs)

    stage.backward_maybe_with_nosync = synced


def pipeline_llm(
    model: nn.Module,
    *,
    pp_mesh: DeviceMesh,
    parallelism: ParallelismConfig,
    num_microbatches: int,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    parallelize_stage: Callable[[nn.Module], nn.Module],
    sync_every_microbatch: bool = False,
) -> Pipeline:
    """Split a meta-device decoder into pp_degree x (1 or 2) stages, parallelize and materialise this
    rank's stages with `parallelize_stage`, and build the configured schedule over them. With
    `sync_every_microbatch`, FSDP stages reduce-scatter each microbatch's gradients in its backward
    (see ``_reduce_scatter_every_microbatch``)."""
    pp_degree, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    schedule_name = parallelism.pipeline_parallel_schedule
    stage_ids = stages_of_rank(pp_rank, pp_degree, schedule_name)
    num_stages = pp_degree * len(stage_ids)
    ranges = stage_layer_ranges(list(model.layers), num_stages, parallelism.pipeline_parallel_split_points)
    parts, stages = [], []
    for stage_id in stage_ids:
        part = stage_module(model, ranges[stage_id], stage_id == 0, stage_id == num_stages - 1)
        part = parallelize_stage(part)
        parts.append(part)
        stage = PipelineStage(part, stage_id, num_stages, device, group=pp_mesh.get_group())
        _without_side_effects_in_metadata_inference(stage)
        if sync_every_microbatch:
            _reduce_scatter_every_microbatch(stage)
        stages.append(stage)
    schedule_class = get_schedule_class(schedule_name)
    single = issubclass(schedule_class, PipelineScheduleSingle)
    schedule = schedule_class(
        stages[0] if single else stages, n_microbatches=num_microbatches, loss_fn=loss_fn, scale_grads=False
    )
    return Pipeline(
        schedule=schedule,
        model_parts=parts,
        has_first_stage=0 in stage_ids,
        has_last_stage=num_stages - 1 in stage_ids,
        num_microbatches=num_microbatches,
    )
