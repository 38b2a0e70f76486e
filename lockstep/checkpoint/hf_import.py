"""``lockstep convert from-hf``: a Hugging Face folder -> a model-only lockstep checkpoint (step 0),
in one process or sharded over the ranks of a torchrun launch.

With N ranks every parameter is a DTensor sharded on dim 0 (FSDP's split), and each rank reads only
the boxes of the safetensors files its shard covers (load_hf_weights, the same reader as
checkpoint.initial_load_path) and writes only its shard, so its memory grows with 1/N of the model
and a model that fits no host converts on several. The values do not depend on N: a checkpoint
holds tensors by name, not by layout, and N=1 and N=2 write bitwise identical tensors (tested).

Why not the trainer's seed-checkpoint path with initial_load_path: it takes the model args from a
flavor and the tokenizer's vocabulary, and only the architecture fields are compared with the
folder's config.json (rope_theta or norm_eps would silently become the flavor's), and it needs a
data set. Here the args come from config.json, as they always have for from-hf."""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor import empty as dtensor_empty

from lockstep.checkpoint import folders
from lockstep.checkpoint.checksums import ChecksumWriter
from lockstep.checkpoint.errors import CheckpointError
from lockstep.checkpoint.hf import is_hf_folder, load_hf_weights
from lockstep.checkpoint.states import persistent_tensors
from lockstep.models.registry import ModelSpec, family_of_hf_config, hf_config_args, model_spec
from lockstep.untrusted import read_hf_config


def check_import(hf_dir: Path, out_dir: Path, model_name: str | None = None) -> tuple[ModelSpec, object]:
    """Refuse what would fail or destroy something, before any weight is read (and before a launch
    starts N processes): a folder without safetensors (pickled weights are never read), an unknown
    model, or an output folder that is not new or empty. Returns the model spec (`model_name`, or the
    family of config.json's ``model_type``) and its args, read from the folder's config.json."""
    if not is_hf_folder(hf_dir):
        raise CheckpointError(hf_dir, "is not a Hugging Face model folder (config.json and *.safetensors)")
    folders.require_new_or_empty(out_dir, "an import")
    config = read_hf_config(hf_dir)
    spec = model_spec(model_name or family_of_hf_config(config, hf_dir / "config.json"))
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is not None and model_type not in spec.hf_model_types:  # --model names another family
        raise CheckpointError(
            hf_dir, f"holds a {model_type!r} model, not {spec.name}", "drop --model (the family comes from model_type)"
        )
    args = hf_config_args(spec, config, hf_dir / "config.json")
    return spec, args


def _targets(shapes: dict[str, torch.Size], mesh: DeviceMesh | None) -> dict[str, torch.Tensor]:
    """Empty fp32 tensors to read into: whole ones in one process; with a mesh, DTensors split on
    dim 0 as FSDP splits them (torch.chunk sizes; a rank past the end holds an empty shard)."""
    if mesh is None:
        return {name: torch.empty(shape, dtype=torch.float32) for name, shape in shapes.items()}
    targets = {}
    for name, shape in shapes.items():
        placement = Shard(0) if shape else Replicate()  # a scalar has no dim to split
        targets[name] = dtensor_empty(shape, dtype=torch.float32, device_mesh=mesh, placements=[placement])
    return targets


def import_from_hf(hf_dir: Path, out_dir: Path, model_name: str | None = None) -> dict:
    """Write a model-only lockstep checkpoint (step 0) of a Hugging Face folder into `out_dir` (new or
    empty); returns this rank's timings. The model family is `model_name`, or else the one of
    config.json's ``model_type``. Call it on every rank when torch.distributed is initialised
    (each reads and writes its shards; rank 0 publishes), else in one process holding the model."""
    timings, started = {}, time.perf_counter()
    spec, args = check_import(hf_dir, out_dir, model_name)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.barrier()  # every rank has checked out_dir before any rank writes into it
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in persistent_tensors(spec.build(args, "sdpa")).items()}
    mesh = init_device_mesh("cpu", (world,)) if world > 1 else None
    weights = _targets(shapes, mesh)
    load_hf_weights(hf_dir, spec, args, weights)
    timings["load_and_convert_s"] = time.perf_counter() - started
    started = time.perf_counter()
    partial, final = folders.partial_folder(out_dir, 0), folders.step_folder(out_dir, 0)
    # DCP's save returns on every rank once rank 0 has written the metadata, i.e. all ranks are done.
    with warnings.catch_warnings():  # DCP warns that no_dist means one process: it does here
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        writer = ChecksumWriter(str(partial))
        dcp.save({"model": weights}, storage_writer=writer, no_dist=world == 1)
    if world == 1 or dist.get_rank() == 0:
        manifest = {
            "format": folders.FORMAT,
            "step": 0,
            "model_only": True,
            "parts": ["model"],
            "model": {"name": spec.name, "flavor": f"hf:{hf_dir.name}", "args": dataclasses.asdict(args)},
            "source": str(hf_dir),
        }
        folders.publish(partial, final, manifest, writer.files)
    if world > 1:
        dist.barrier()  # every rank returns with the checkpoint published
    timings["save_s"] = time.perf_counter() - started
    return timings
