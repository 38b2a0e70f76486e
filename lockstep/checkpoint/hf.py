"""Hugging Face safetensors folders: export a lockstep checkpoint, import into one, and read HF weights
into any layout through DCP's Hugging Face storage reader. Each phase is timed.

Only safetensors are read from a Hugging Face folder (a folder of pickled ``.bin``/``.pt`` weights is
refused, never unpickled); lockstep checkpoints are verified and read through the pickle allow-list."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.api import CheckpointException

from lockstep.checkpoint import folders
from lockstep.checkpoint.checksums import ChecksumWriter
from lockstep.checkpoint.errors import CheckpointError
from lockstep.checkpoint.safe_reader import SafeFileSystemReader, SafeLoadPlanner
from lockstep.models.registry import ModelSpec, model_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder lockstep can read: config.json and safetensors. One that holds only
    pickled weights is refused here, since unpickling them could run code."""
    if not (path / "config.json").is_file():
        return False
    if any(path.glob("*.safetensors")):
        return True
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
    if pickled:
        raise CheckpointError(
            path, f"holds pickled weights ({', '.join(pickled)}), which lockstep never loads (they can run code)",
            "convert them to safetensors first (transformers: save_pretrained(..., safe_serialization=True))",
        )  # fmt: skip
    return False


def resolve_checkpoint_folder(path: Path, check=folders.problem_with) -> Path:
    """A published step folder (verified by `check`), or the newest intact one under a checkpoint
    root or run folder."""
    if (path / folders.MANIFEST).is_file():
        if problem := check(path):
            raise CheckpointError(path, f"damaged checkpoint: {problem}", "choose another checkpoint")
        return path
    for root in (path, path / "checkpoint"):
        found = folders.find_checkpoint(root, -1, print, check=check)
        if found is not None:
            return found
    raise CheckpointError(
        path, "holds no lockstep checkpoint (looked for step-N folders here and in checkpoint/)", "give a run folder"
    )


def read_model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full model weights of a checkpoint, in one process, whatever layout wrote them."""
    reader = SafeFileSystemReader(str(folder))
    metadata = reader.read_metadata().state_dict_metadata
    state = {
        key.removeprefix("model."): torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith("model.")
    }
    try:  # the checksums are verified as the files are read
        dcp.load({"model": state}, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    except CheckpointException as failure:
        ours = [e for e, _ in failure.failures.values() if isinstance(e, CheckpointError)]
        raise (ours[0] if ours else failure) from None
    return state


def export_to_hf(checkpoint: Path, out_dir: Path, dtype: str = "fp32", max_shard_bytes: int = 5 << 30) -> dict:
    """Write `checkpoint`'s model as safetensors (sharded with an index past max_shard_bytes) and a
    config.json that transformers loads; returns the phase timings in seconds."""
    timings, started = {}, time.perf_counter()
    folder = resolve_checkpoint_folder(checkpoint)
    manifest = folders.read_manifest(folder)
    spec = model_spec(manifest["model"]["name"])
    args = spec.args_from_dict(manifest["model"]["args"])
    weights = read_model_weights(folder)
    timings["load_s"] = time.perf_counter() - started
    started = time.perf_counter()
    hf_state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in spec.hf_adapter.to_hf(weights, args).items()}
    timings["convert_s"] = time.perf_counter() - started
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / file), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, file)
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = spec.hf_adapter.hf_config(args, DTYPE_NAMES[DTYPES[dtype]])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    timings["save_s"] = time.perf_counter() - started
    return timings


def read_hf_weights(hf_dir: Path, spec: ModelSpec, args, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Full lockstep-named tensors of the shapes in `shapes`, read from a Hugging Face folder through
    DCP's Hugging Face storage reader (each rank reads; no pickles involved)."""
    hf_state = {
        spec.hf_adapter.hf_name(name): torch.empty(shape, dtype=torch.float32) for name, shape in shapes.items()
    }
    dcp.load(hf_state, storage_reader=HuggingFaceStorageReader(str(hf_dir)))
    return spec.hf_adapter.from_hf(hf_state, args)


def check_hf_config(hf_dir: Path, spec: ModelSpec, args) -> None:
    """Refuse a Hugging Face model whose architecture differs from this run's flavor."""
    theirs = spec.hf_adapter.args_from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    fields = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_hidden_dim")
    differences = [
        f"{f}: {getattr(theirs, f)} vs {getattr(args, f)}" for f in fields if getattr(theirs, f) != getattr(args, f)
    ]
    if differences:
        raise ValueError(
            f"the Hugging Face model in {hf_dir} does not match this run's model ({'; '.join(differences)})"
        )


def import_from_hf(hf_dir: Path, out_dir: Path, model_name: str = "llama3") -> dict:
    """Write a model-only lockstep checkpoint (step 0) of a Hugging Face folder; returns timings."""
    timings, started = {}, time.perf_counter()
    if not is_hf_folder(hf_dir):
        raise CheckpointError(hf_dir, "is not a Hugging Face model folder (config.json and *.safetensors)")
    spec = model_spec(model_name)
    args = spec.hf_adapter.args_from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in spec.build(args, "sdpa").named_parameters()}
    weights = read_hf_weights(hf_dir, spec, args, shapes)
    timings["load_and_convert_s"] = time.perf_counter() - started
    started = time.perf_counter()
    partial, final = folders.partial_folder(out_dir, 0), folders.step_folder(out_dir, 0)
    dcp.save({"model": weights}, storage_writer=ChecksumWriter(str(partial)), no_dist=True)
    manifest = {
        "format": folders.FORMAT,
        "step": 0,
        "model_only": True,
        "parts": ["model"],
        "model": {"name": model_name, "flavor": f"hf:{hf_dir.name}", "args": dataclasses.asdict(args)},
        "source": str(hf_dir),
    }
    folders.publish(partial, final, manifest)
    timings["save_s"] = time.perf_counter() - started
    return timings
