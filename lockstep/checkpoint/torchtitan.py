"""A torchtitan checkpoint (a DCP ``step-N`` folder written by torchtitan's CheckpointManager) as the start
of a lockstep run: ``checkpoint.initial_load_path``, and with ``initial_load_model_only = false`` training goes
on from its step.

What torchtitan writes (0.2 and 0.3, from their checkpointers): the model's state dict flattened to the top
level under torchtitan's parameter names; ``optimizer.state.NAME.{step,exp_avg,exp_avg_sq}`` and
``optimizer.param_groups.NAME.*`` (its OptimizersContainer's flattened state); ``lr_scheduler.last_epoch``;
``train_state.{step,ntokens_seen}``; ``dataloader.*``. A model-only save holds the model alone.

Names: torchtitan 0.3's llama3 differs from lockstep's in two places. The attention's projections live
under ``attention.qkv_linear`` and the output projection is ``lm_head``. Its fused QKV module saves the
weight split into wq/wk/wv (a state-dict hook), but the optimizer keys its state by the fused parameter
``attention.qkv_linear.wqkv.weight``, whose rows run per key/value head group: the group's query heads, its
key head, its value head. 0.2 used lockstep's names.

What is read: tensors and the plain values above, through lockstep's safe reader (nothing unpickled runs
code). torchtitan's data-loader state (its own pickled buffers) is never read: the run's data continue at the
same step of its own order. Each rank reads its shards of every tensor except the fused optimizer moments,
which are read whole one (layer, moment) at a time: (n_heads + 2 n_kv_heads) x head_dim x dim floats.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointError, CheckpointMismatch
from lockstep.checkpoint.safe_reader import SafeFileSystemReader, SafeLoadPlanner
from lockstep.checkpoint.states import OptimizerState, persistent_tensors
from lockstep.parallel.reducer import agreed_problem

FAMILIES = ("llama3",)
"""Model families whose torchtitan names lockstep maps."""
_PROJECTION = re.compile(r"^(?P<attention>layers\.\d+\.attention)\.w(?P<which>[qkv])\.weight$")
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
_TRAINING_KEYS = ("train_state.step", "train_state.ntokens_seen", "lr_scheduler.last_epoch")


def is_torchtitan_checkpoint(folder: Path) -> bool:
    """A DCP folder without lockstep's manifest: what torchtitan's checkpointer writes."""
    return (folder / ".metadata").is_file() and not folders.has_manifest(folder)


def torchtitan_name(name: str, stored: Collection[str]) -> str:
    """The name under which a torchtitan checkpoint holding `stored` keeps lockstep's parameter `name`."""
    if name == "output.weight" and "lm_head.weight" in stored:
        return "lm_head.weight"
    if (match := _PROJECTION.match(name)) and (
        projection := f"{match['attention']}.qkv_linear.w{match['which']}.weight"
    ) in stored:
        return projection
    return name


def split_fused_qkv(fused: torch.Tensor, *, head_dim: int, q_rows: int, kv_rows: int) -> dict[str, torch.Tensor]:
    """torchtitan's fused ``wqkv`` rows (per key/value group: its query heads, its key head, its value head)
    as lockstep's wq, wk and wv (rows of all query heads, then of all key heads, then of all value heads)."""
    kv_heads, per_group = kv_rows // head_dim, q_rows // kv_rows
    grouped = fused.reshape(kv_heads, per_group + 2, head_dim, *fused.shape[1:])
    return {
        "q": grouped[:, :per_group].reshape(q_rows, *fused.shape[1:]),
        "k": grouped[:, per_group].reshape(kv_rows, *fused.shape[1:]),
        "v": grouped[:, per_group + 1].reshape(kv_rows, *fused.shape[1:]),
    }


def load_torchtitan_checkpoint(
    folder: Path, *, states: Mapping, parts: list[nn.Module], family: str, head_dim: int, model_only: bool,
    exclude: Collection[str] = (),
) -> int | None:  # fmt: skip
    """Load `folder`'s model into `parts` (any layout: DCP reads each rank's shards); unless `model_only`,
    also the optimizer state, the schedule's step and the train state into `states` (the trainer's
    checkpoint states), leaving out the parts in `exclude`. Returns the step training goes on from, or None
    (model only)."""
    if family not in FAMILIES:
        raise CheckpointError(
            folder, f"is a torchtitan checkpoint, which lockstep reads for {', '.join(FAMILIES)} models, not {family}",
            "save it from torchtitan in Hugging Face format (checkpoint.last_save_in_hf) and load that folder",
        )  # fmt: skip
    stored = SafeFileSystemReader(str(folder), verify=False).read_metadata().state_dict_metadata
    if "model" not in exclude:
        model = {torchtitan_name(name, stored): t for part in parts for name, t in persistent_tensors(part).items()}
        _refuse(folder, _misfits(model, stored))
        _load(folder, model)
    if model_only:
        return None
    if missing := [key for key in _TRAINING_KEYS if key not in stored]:
        raise CheckpointMismatch(
            f"torchtitan checkpoint {folder} holds no {', '.join(missing)} (a model-only save): set "
            "checkpoint.initial_load_model_only = true to start from its weights at step 0"
        )
    plain = {"train_state": {"step": 0, "ntokens_seen": 0}, "lr_scheduler": {"last_epoch": 0}}
    _load(folder, plain)
    if "optimizer" not in exclude:
        _load_optimizer(folder, states["optimizer"], stored, head_dim)
    if "lr_scheduler" not in exclude:
        last = int(plain["lr_scheduler"]["last_epoch"])
        states["lr_scheduler"].load_state_dict({"last_epoch": last, "_step_count": last + 1})
    if "train_state" not in exclude:
        train = plain["train_state"]
        states["train_state"].load_state_dict({"step": int(train["step"]), "tokens_seen": int(train["ntokens_seen"])})
        return int(train["step"])
    return 0


def _load(folder: Path, state: dict) -> None:
    reader = SafeFileSystemReader(str(folder), verify=False)  # torchtitan writes no checksums
    dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(folder=str(folder)))


def _misfits(wanted: Mapping[str, torch.Tensor], stored: Mapping) -> str | None:
    """The tensors the checkpoint lacks or holds in another shape (at most three named), or None."""
    misfits = []
    for key, target in wanted.items():
        meta = stored.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            misfits.append(f"{key} is missing")
        elif tuple(meta.size) != tuple(target.shape):
            misfits.append(f"{key} is {tuple(meta.size)} there, {tuple(target.shape)} here")
    if not misfits:
        return None
    more = f" (and {len(misfits) - 3} more)" if len(misfits) > 3 else ""
    return f"{'; '.join(misfits[:3])}{more}"


def _refuse(folder: Path, problem: str | None) -> None:
    """Refuse on every rank if any rank found a misfit (each checks its own shards): a rank that went on into
    DCP's collective load alone would wait for the others forever."""
    if problem := agreed_problem(problem):
        raise CheckpointMismatch(
            f"torchtitan checkpoint {folder} does not fit this model: {problem}; give the model args of the job "
            "that wrote it (lockstep config from-torchtitan JOB; a lockstep step folder without its manifest is an "
            "unfinished save)"
        )


def _most_over_ranks(count: int) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    most = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def _load_optimizer(folder: Path, optimizer_state: OptimizerState, stored: Mapping, head_dim: int) -> None:
    """Adam's state of every part on this rank: the moments keyed by torchtitan's names in one load per part,
    then each fused QKV moment whole and split, then set into the optimizers. Each rank makes as many DCP
    loads as the others (padded with empty ones): pipeline stages hold different numbers of layers, and
    every DCP load is a collective."""
    pending, fused_loads = [], []
    for part, optimizer in optimizer_state.pairs:
        ours = get_optimizer_state_dict(part, optimizer, options=_FLAT)
        direct, fused = {}, {}
        for key, target in ours.items():
            if not key.startswith("state."):
                continue  # the param groups: this run's config sets them
            name, _, slot = key.removeprefix("state.").rpartition(".")
            theirs = f"optimizer.state.{torchtitan_name(name, stored)}.{slot}"
            match = _PROJECTION.match(name)
            fused_key = f"optimizer.state.{match['attention']}.qkv_linear.wqkv.weight.{slot}" if match else ""
            if theirs not in stored and fused_key in stored:
                fused.setdefault(fused_key, {})[match["which"]] = target
            else:
                direct[theirs] = target  # refused below if missing
        _refuse(folder, _misfits(direct, stored) or _fused_misfits(fused, stored))
        _load(folder, direct)
        fused_loads += [(key, fused[key]) for key in sorted(fused)]
        pending.append((part, optimizer, ours))
    for key, targets in fused_loads:
        _load_fused(folder, key, targets, stored[key], head_dim)
    for _ in range(_most_over_ranks(len(fused_loads)) - len(fused_loads)):
        _load(folder, {})
    for part, optimizer, ours in pending:
        set_optimizer_state_dict(part, optimizer, ours, options=_FLAT)


def _fused_misfits(fused: Mapping[str, dict[str, torch.Tensor]], stored: Mapping) -> str | None:
    """A fused moment whose rows are not this model's q, k and v rows together, or None."""
    for key, targets in fused.items():
        size = tuple(stored[key].size)
        if size and size[0] != targets["q"].shape[0] + 2 * targets["k"].shape[0]:
            return f"{key} has {size[0]} rows, not this model's q, k and v"
    return None


def _load_fused(folder: Path, key: str, targets: dict[str, torch.Tensor], meta, head_dim: int) -> None:
    whole = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    _load(folder, {key: whole})
    if whole.dim() == 0:  # Adam's step count, one per parameter
        pieces = dict.fromkeys(targets, whole)
    else:
        pieces = split_fused_qkv(whole, head_dim=head_dim, q_rows=targets["q"].shape[0], kv_rows=targets["k"].shape[0])
    for which, target in targets.items():
        piece = pieces[which]
        if isinstance(target, DTensor):  # every rank holds the whole piece: no communication
            piece = distribute_tensor(piece, target.device_mesh, target.placements, src_data_rank=None)
        with torch.no_grad():
            target.copy_(piece)
