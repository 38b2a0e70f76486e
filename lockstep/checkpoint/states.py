"""What goes into a checkpoint, as DCP ``Stateful`` objects keyed by parameter name.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict`` with flattened
optimizer keys (``state.layers.0.attention.wq.weight.exp_avg``), so neither depends on the layout:
DCP reshards DTensors on load, and pipeline stages save and load their own names. Non-tensor values
(scheduler counters, the loader position, RNG states of Python and NumPy) are stored as plain
Python data; DCP's own planner would unpickle them with ``weights_only=False``, so lockstep reads them
through ``safe_reader.SafeLoadPlanner`` (``torch.load(weights_only=True)``) and they must stay plain.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_OPTIMIZER_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def persistent_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name (the MoE router bias is a buffer): what a model
    checkpoint holds, without building a state dict (FSDP's parameters come back as they are)."""
    tensors = dict(module.named_parameters())
    for prefix, submodule in module.named_modules():
        for name, buffer in submodule.named_buffers(recurse=False):
            if name not in submodule._non_persistent_buffers_set:
                tensors[f"{prefix}.{name}" if prefix else name] = buffer
    return tensors


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """Names under which a parameter appears again (a tied output projection, ``output.weight``) ->
    the name it is held under (``tok_embeddings.weight``, the first)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


class ModelState:
    """A tied parameter is saved once, under its first name (``persistent_tensors``' names)."""

    def __init__(self, parts: list[nn.Module], dtype: torch.dtype | None = None) -> None:
        self.parts = parts
        self.dtype = dtype
        """Save a converted copy in this dtype (model-only exports); None saves the parameters themselves."""

    def state_dict(self) -> dict:
        merged = {}
        for part in self.parts:
            aliases = tied_aliases(part)
            merged |= {k: v for k, v in get_model_state_dict(part).items() if k not in aliases}
        if self.dtype is not None:
            merged = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in merged.items()}
        return merged

    def load_state_dict(self, state: dict) -> None:
        for part in self.parts:
            aliases = tied_aliases(part)
            names = get_model_state_dict(part).keys()
            set_model_state_dict(part, {k: state[aliases.get(k, k)] for k in names})


class OptimizerState:
    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        self.pairs = list(zip(parts, optimizers, strict=True))

    def state_dict(self) -> dict:
        merged = {}
        for part, optimizer in self.pairs:
            merged |= get_optimizer_state_dict(part, optimizer, options=_OPTIMIZER_OPTIONS)
        return merged

    def load_state_dict(self, state: dict) -> None:
        for part, optimizer in self.pairs:
            names = get_optimizer_state_dict(part, optimizer, options=_OPTIMIZER_OPTIONS).keys()
            set_optimizer_state_dict(part, optimizer, {k: state[k] for k in names}, options=_OPTIMIZER_OPTIONS)


class SchedulerState:
    """All parts' schedulers advance together; one state is saved, and only its step count is
    restored into each. The learning rates are recomputed from this run's schedule at that step (see
    `apply`) rather than restored, so a resumed run trains at what its config says: a new peak lr or
    a longer run changes the schedule from the resumed step on. With an unchanged config the
    recomputed rates are the saved ones, bit for bit (the same expression on the same numbers)."""

    RESTORED = ("last_epoch", "_step_count")

    def __init__(self, schedulers: list) -> None:
        self.schedulers = schedulers

    def state_dict(self) -> dict:
        return {k: v for k, v in self.schedulers[0].state_dict().items() if k != "lr_lambdas"}

    def load_state_dict(self, state: dict) -> None:
        for scheduler in self.schedulers:
            for key in self.RESTORED:
                if key in state:
                    setattr(scheduler, key, int(state[key]))
        self.apply()

    def apply(self) -> None:
        """Set each group's lr to the schedule's value at the current step, from the scheduler's base
        lrs (the config's peak lr) and lambdas (the config's schedule and total steps). Call it again
        after loading the optimizer state, whose param groups carry the saved lr."""
        for scheduler in self.schedulers:
            pairs = zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
            lrs = [base * fn(scheduler.last_epoch) for fn, base in pairs]
            for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            scheduler._last_lr = lrs


class RNGState:
    """The generators of this pipeline rank (the same on all its data/tensor-parallel ranks, so one
    copy per pipeline rank is kept): torch CPU and CUDA, Python, NumPy."""

    def __init__(self, pipeline_rank: int, device: torch.device) -> None:
        self.key = f"pipeline_rank_{pipeline_rank}"
        self.device = device

    def state_dict(self) -> dict:
        version, mt_state, gauss = random.getstate()
        numpy_state = np.random.get_state()
        state = {
            "torch_cpu": torch.get_rng_state(),
            "python": {"version": version, "state": list(mt_state), "gauss": gauss},
            "numpy": {
                "key": torch.from_numpy(numpy_state[1].astype(np.int64)),
                "pos": int(numpy_state[2]),
                "has_gauss": int(numpy_state[3]),
                "cached_gaussian": float(numpy_state[4]),
            },
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return {self.key: state}

    def load_state_dict(self, state: dict) -> None:
        mine = state[self.key]
        torch.set_rng_state(mine["torch_cpu"])
        python = mine["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        numpy = mine["numpy"]
        key = numpy["key"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", key, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)


class ObjectState:
    """Adapts an object with state_dict()/load_state_dict() of plain values (loader, train state).

    `optional` names keys added in a later version of lockstep: a checkpoint saved before them still
    loads (the manager sets ``absent`` to those it lacks, and the object's load_state_dict keeps its
    default for them), where DCP would otherwise refuse the missing key."""

    def __init__(self, obj, check_on_load: bool = True, optional: tuple[str, ...] = ()) -> None:
        self.obj = obj
        self.check_on_load = check_on_load
        self.optional = optional
        self.absent: set[str] = set()

    def state_dict(self) -> dict:
        return {k: v for k, v in self.obj.state_dict().items() if k not in self.absent}

    def load_state_dict(self, state: dict) -> None:
        if self.check_on_load:
            self.obj.load_state_dict(state)
        else:
            self.obj.load_state_dict(state, check=False)
