"""Hugging Face safetensors folders: export a lockstep checkpoint, and read HF weights into any layout
through DCP's Hugging Face storage reader (for checkpoint.initial_load_path and for `convert from-hf`,
lockstep.checkpoint.hf_import). Each phase is timed.

Reading into a sharded model never builds a full tensor: each rank reads, from the safetensors files,
only the boxes its shards cover (the model's adapter says where each element lives, see
lockstep.models.common.hf_source), so its memory grows with its shard, as at 70B it must.

Only safetensors are read from a Hugging Face folder (a folder of pickled ``.bin``/``.pt`` weights is
refused, never unpickled); lockstep checkpoints are verified and read through the pickle allow-list."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.tensor import DTensor

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointError
from lockstep.checkpoint.hf_tokenizer import recorded_tokenizer, write_tokenizer_files
from lockstep.checkpoint.manifest import recorded_config, recorded_model
from lockstep.checkpoint.safe_reader import SafeFileSystemReader, SafeLoadPlanner
from lockstep.data.tokenizer import HFTokenizer, Tokenizer
from lockstep.models.common.hf_source import HFPiece
from lockstep.models.registry import ModelSpec, family_of_hf_config, hf_config_args
from lockstep.untrusted import read_hf_config

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


def read_model_weights(
    folder: Path, names: Collection[str] | None = None, verify: bool = True
) -> dict[str, torch.Tensor]:
    """The full model weights of a checkpoint (or only those in `names`), in one process, whatever
    layout wrote them. With `verify`, every data file of the checkpoint is hashed and checked (read
    whole in one streaming pass, however few of its items are wanted)."""
    wanted = None if names is None else set(names)
    reader = SafeFileSystemReader(str(folder), verify=verify)
    metadata = reader.read_metadata().state_dict_metadata
    described = sum(
        math.prod(meta.size) * meta.properties.dtype.itemsize
        for key, meta in metadata.items()
        if isinstance(meta, TensorStorageMetadata) and key.startswith("model.")
    )
    stored = sum(path.stat().st_size for path in folder.glob("*.distcp"))
    if described > stored:  # a .metadata that lies must not make this process allocate what it says
        raise CheckpointError(
            folder, f".metadata describes {described} bytes of weights; its data files hold {stored}",
            "load another checkpoint (this one was changed after saving)",
        )  # fmt: skip
    state = {
        key.removeprefix("model."): torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith("model.") and (wanted is None or key.removeprefix("model.") in wanted)
    }
    try:  # the checksums are verified as the files are read
        dcp.load({"model": state}, storage_reader=reader, planner=SafeLoadPlanner(folder=str(folder)), no_dist=True)
    except CheckpointException as failure:
        ours = [e for e, _ in failure.failures.values() if isinstance(e, CheckpointError)]
        raise (ours[0] if ours else failure) from None
    return state


@dataclasses.dataclass
class _HFShard:
    """One safetensors file of an export: its Hugging Face tensors (name -> bytes, in order) and the
    lockstep tensors they are made from."""

    hf_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    sources: list[str] = dataclasses.field(default_factory=list)


def _plan_hf_shards(folder: Path, spec: ModelSpec, args, dtype: torch.dtype, max_shard_bytes: int) -> list[_HFShard]:
    """Pack the export's tensors into files of at most max_shard_bytes (a bigger tensor alone), in
    checkpoint order, without reading a weight: the adapter converts meta tensors, which gives the
    Hugging Face names and shapes. A lockstep tensor whose pieces (experts) span two files is a
    source of both."""
    stored = SafeFileSystemReader(str(folder)).read_metadata().state_dict_metadata
    element = torch.empty((), dtype=dtype).element_size()
    shards, size = [_HFShard()], 0
    metas = {key.removeprefix("model."): meta for key, meta in stored.items() if key.startswith("model.")}
    for unit in export_units(spec, list(metas)):
        fakes = {n: torch.empty(tuple(metas[n].size), dtype=metas[n].properties.dtype, device="meta") for n in unit}
        for hf_name, value in spec.hf_adapter.to_hf(fakes, args).items():
            nbytes = value.numel() * element
            if shards[-1].hf_bytes and size + nbytes > max_shard_bytes:
                shards.append(_HFShard())
                size = 0
            shards[-1].hf_bytes[hf_name] = nbytes
            size += nbytes
            recent = shards[-1].sources[-len(unit) :]
            shards[-1].sources.extend(n for n in unit if n not in recent)
    return shards


def export_units(spec: ModelSpec, names: list[str]) -> list[list[str]]:
    """The lockstep tensors an export converts together, in order: one by one, except those the adapter
    fuses into one Hugging Face tensor (its ``FUSED_ON_EXPORT``: groups of name suffixes within a
    block, e.g. Llama 4's w1 and w3 experts, one gate_up_proj)."""
    fused = getattr(spec.hf_adapter, "FUSED_ON_EXPORT", ())
    units: list[list[str]] = []
    together: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for name in names:
        group = next((g for g in fused if name.endswith(tuple("." + s for s in g))), None)
        if group is None:
            units.append([name])
            continue
        key = (name.rsplit(".", len(group[0].split(".")))[0], group)
        if key not in together:
            together[key] = []
            units.append(together[key])
        together[key].append(name)
    return units


def export_to_hf(
    checkpoint: Path,
    out_dir: Path,
    dtype: str = "fp32",
    max_shard_bytes: int = 5 << 30,
    *,
    tokenizer_path: Path | None = None,
    note: Callable[[str], None] = print,
) -> dict:
    """Write `checkpoint`'s model as safetensors (sharded with an index past max_shard_bytes), a
    config.json that transformers loads, and the tokenizer files (lockstep.checkpoint.hf_tokenizer: the
    run's tokenizer, or `tokenizer_path`); returns the phase timings in seconds (summed over files).
    A checkpoint that records no tokenizer (an import from Hugging Face) exports without one, with a
    `note` saying how to add it.

    It streams, one output file at a time: read that file's lockstep tensors (a subset, through the
    allow-list reader), convert them one by one, write the file and free it; so memory peaks near
    one file (plus one lockstep tensor), not the model, and any checkpoint exports on one host. The
    first read verifies every data file's checksum (a streaming hash pass); the later reads trust
    the files just verified rather than hash the whole checkpoint once per output file."""
    folders.require_new_or_empty(out_dir, "an export")
    timings = dict.fromkeys(("load_s", "convert_s", "save_s"), 0.0)
    started = time.perf_counter()
    folder = resolve_checkpoint_folder(checkpoint)
    manifest = folders.read_manifest(folder)
    spec, args = recorded_model(folder, manifest)
    tokenizer = _export_tokenizer(folder, manifest, tokenizer_path)  # refused before anything is written
    shards = _plan_hf_shards(folder, spec, args, DTYPES[dtype], max_shard_bytes)
    timings["load_s"] += time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]  # fmt: skip
    for i, (shard, file) in enumerate(zip(shards, files, strict=True)):
        started = time.perf_counter()
        weights = read_model_weights(folder, shard.sources, verify=i == 0)
        timings["load_s"] += time.perf_counter() - started
        started = time.perf_counter()
        hf_state = {}
        for unit in export_units(spec, shard.sources):  # one lockstep tensor (or fused group) at a time
            for hf_name, value in spec.hf_adapter.to_hf({n: weights.pop(n) for n in unit}, args).items():
                if hf_name in shard.hf_bytes:
                    hf_state[hf_name] = value.to(DTYPES[dtype]).contiguous()
        hf_state = {hf_name: hf_state[hf_name] for hf_name in shard.hf_bytes}  # the planned order
        timings["convert_s"] += time.perf_counter() - started
        started = time.perf_counter()
        save_file(hf_state, str(out_dir / file), metadata={"format": "pt"})
        del hf_state
        timings["save_s"] += time.perf_counter() - started
    started = time.perf_counter()
    if len(shards) > 1:
        weight_map = {name: file for shard, file in zip(shards, files, strict=True) for name in shard.hf_bytes}
        total = sum(nbytes for shard in shards for nbytes in shard.hf_bytes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = spec.hf_adapter.hf_config(args, DTYPE_NAMES[DTYPES[dtype]])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out_dir, args.max_seq_len)
    else:
        note(f"note: {folder} records no tokenizer; the export has none (pass --tokenizer-path to add one)")
    timings["save_s"] += time.perf_counter() - started
    return timings


def _export_tokenizer(folder: Path, manifest: dict, tokenizer_path: Path | None) -> Tokenizer | None:
    """The tokenizer to export: `tokenizer_path`, or the one the run's recorded config names (checked
    against the recorded fingerprint), or None when the checkpoint records neither config nor tokenizer."""
    if tokenizer_path is not None:
        return HFTokenizer(tokenizer_path)
    config = recorded_config(folder, manifest)
    fingerprint = (manifest.get("fingerprints") or {}).get("tokenizer")
    if config is None and fingerprint is None:
        return None
    return recorded_tokenizer(folder, config, fingerprint)


@dataclasses.dataclass(frozen=True)
class _BoxRead:
    """Box `at` (extent dest.shape) of Hugging Face tensor `name` goes into `dest`, a view."""

    name: str
    hf_shape: tuple[int, ...]
    at: tuple[int, ...]
    dest: torch.Tensor


class _BoxLoadPlanner(LoadPlanner):
    """Reads the given boxes of Hugging Face tensors straight into the given views, and nothing else:
    no state dict of full tensors is built and nothing is unpickled (there are no byte items)."""

    def __init__(self, reads: list[_BoxRead]) -> None:
        self.reads = reads

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for i, read in enumerate(self.reads):
            stored = self.metadata.state_dict_metadata[read.name]
            box = ChunkStorageMetadata(offsets=torch.Size(read.at), sizes=read.dest.shape)
            for item in create_read_items_for_chunk_list(read.name, stored, [box]):  # one per stored chunk
                items.append(dataclasses.replace(item, dest_index=MetadataIndex(str(i), item.dest_index.offset)))
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise ValueError(f"{read_item.storage_index.fqn} is not a tensor; Hugging Face folders hold only tensors")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self.reads[int(read_item.dest_index.fqn)].dest
        return narrow_tensor_by_index(dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the data is already in place


def _shard_box(name: str, target: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """This rank's values of `target` (a view to write into) and their offset in the full tensor; the
    box is the one DCP itself would read for the DTensor."""
    if not isinstance(target, DTensor):
        return target, (0,) * target.dim()
    local, chunks = target.to_local(), target.__create_chunk_list__()
    if len(chunks) != 1 or tuple(chunks[0].sizes) != tuple(local.shape):
        raise ValueError(f"cannot read Hugging Face weights into {name}: placements {target.placements}")
    return local, tuple(chunks[0].offsets)


def _swap_last(box: tuple[int, ...]) -> tuple[int, ...]:
    return (*box[:-2], box[-1], box[-2])


def _piece_reads(name: str, pieces: tuple[HFPiece, ...], dest: torch.Tensor, at: tuple[int, ...]) -> list[_BoxRead]:
    """The reads that fill `dest`, the box of lockstep tensor `name` at `at`, from the pieces it meets."""
    reads, covered = [], 0
    for piece in pieces:
        start = [max(a, b) for a, b in zip(piece.at, at, strict=True)]
        stop = [min(a + n, b + m) for a, n, b, m in zip(piece.at, piece.size, at, dest.shape, strict=True)]
        if any(a >= b for a, b in zip(start, stop, strict=True)):
            continue
        view = dest[tuple(slice(a - o, b - o) for a, b, o in zip(start, stop, at, strict=True))]
        dropped = dest.dim() - len(piece.hf_at)  # leading dims of extent 1 that HF does not have
        view = view[(0,) * dropped]
        piece_hf_at = _swap_last(piece.hf_at) if piece.transposed else piece.hf_at
        inside = zip(piece_hf_at, start[dropped:], piece.at[dropped:], strict=True)
        hf_at = tuple(h + a - p for h, a, p in inside)
        if piece.transposed:  # the read fills a transposed view of the destination
            view, hf_at = view.transpose(-2, -1), _swap_last(hf_at)
        reads.append(_BoxRead(piece.name, piece.hf_shape, hf_at, view))
        covered += view.numel()
    if covered != dest.numel():
        raise ValueError(f"the Hugging Face adapter covers {covered} of the {dest.numel()} elements of {name}")
    return reads


def _check_reads(hf_dir: Path, reads: list[_BoxRead], stored: Mapping[str, TensorStorageMetadata]) -> None:
    """Refuse a folder that lacks a tensor or holds one of another shape, before anything is read."""
    for read in reads:
        if read.name not in stored:
            raise CheckpointError(hf_dir, f"has no tensor {read.name}", "give the folder of a matching model")
        if tuple(stored[read.name].size) != read.hf_shape:
            raise CheckpointError(
                hf_dir, f"holds {read.name} of shape {list(stored[read.name].size)}, this model needs "
                f"{list(read.hf_shape)}", "give the folder of a matching model",
            )  # fmt: skip


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check_layer_count(hf_dir: Path, stored: Mapping[str, TensorStorageMetadata], n_layers: int) -> None:
    """Refuse weights of more layers than the config describes (a config.json edited down would otherwise
    load silently as a smaller model; fewer layers than the config is refused by the missing tensor).
    DeepSeek-V3's multi-token-prediction layers (``num_nextn_predict_layers``) follow the decoder's and
    are not loaded."""
    extra = read_hf_config(hf_dir).get("num_nextn_predict_layers") or 0
    indices = {int(m.group(1)) for name in stored if (m := _LAYER_INDEX.search(name))}
    if indices and max(indices) >= n_layers + extra:
        raise CheckpointError(
            hf_dir, f"holds weights of {max(indices) + 1} layers, its config.json describes {n_layers}",
            "give the config.json that belongs to these weights",
        )  # fmt: skip


def check_safetensors_headers(hf_dir: Path) -> None:
    """Refuse, before any tensor is read, a safetensors file whose header lies (offsets past the end, a
    shape or dtype that does not fit its bytes, a 2^60-byte header length, a truncated file): safetensors'
    own validation of every header, which torch's reader does not do before it seeks and allocates."""
    for path in sorted(hf_dir.glob("*.safetensors")):
        if not path.is_file():  # a FIFO or a device would block the open or never end (a link to a blob is fine)
            raise CheckpointError(path, "is not a regular file", "download or export it again")
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                path, f"is not a valid safetensors file ({error})", "download or export it again"
            ) from None


def load_hf_weights(hf_dir: Path, spec: ModelSpec, args, targets: Mapping[str, torch.Tensor]) -> None:
    """Fill `targets` (lockstep name -> a full tensor, or a DTensor of which this rank fills only its
    shard) from a Hugging Face folder, in place. Each rank reads only the boxes of the safetensors
    files that its shards cover, so its memory grows with its shard and never holds a full tensor
    (beyond a block-aligned margin where a row transform meets a shard boundary inside a block). The
    ranks read independently: no collective is involved."""
    check_safetensors_headers(hf_dir)
    reader = HuggingFaceStorageReader(str(hf_dir))
    stored = reader.read_metadata().state_dict_metadata
    reads: list[_BoxRead] = []
    transforms: list[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor, int]] = []
    with torch.no_grad():
        for name, target in targets.items():
            local, at = _shard_box(name, target)
            if local.numel() == 0:
                continue
            source = spec.hf_adapter.hf_source(name, target.shape, stored.keys(), args)
            if not source.pieces:  # not in Hugging Face checkpoints (Qwen3-MoE's routing bias): zero
                local.zero_()
                continue
            buffer, buffer_at = local, at
            if source.row_block:  # read whole blocks of rows, then transform them
                block, rows = source.row_block, local.shape[0]
                first, last = at[0] // block * block, -(-(at[0] + rows) // block) * block
                if (first, last) != (at[0], at[0] + rows):  # a shard boundary splits a block
                    buffer, buffer_at = local.new_empty((last - first, *local.shape[1:])), (first, *at[1:])
                transforms.append((source.rows_from_hf, buffer, local, at[0] - first))
            reads += _piece_reads(name, source.pieces, buffer, buffer_at)
        _check_reads(hf_dir, reads, stored)
        _check_layer_count(hf_dir, stored, args.n_layers)
        with warnings.catch_warnings():  # DCP warns that no_dist means one process: here it means no collectives
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load({}, storage_reader=reader, planner=_BoxLoadPlanner(reads), no_dist=True)
        for rows_from_hf, buffer, local, skip in transforms:  # one parameter's shard at a time
            rows = rows_from_hf(buffer)
            if rows.untyped_storage().data_ptr() == local.untyped_storage().data_ptr():
                rows = rows.clone()  # a transform that came out as a view: copy_ must not overlap
            local.copy_(rows[skip : skip + local.shape[0]])


_ARCHITECTURE_FIELDS = (
    "dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_hidden_dim", "head_dim",  # Llama, Qwen3
    "n_dense_layers", "inter_dim", "moe_inter_dim", "n_routed_experts", "n_shared_experts", "n_activated_experts",
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",  # DeepSeek-V3
    "tie_embeddings", "norm_topk_prob",  # Qwen3 (and Llama 3's tie_embeddings)
    "interleave_moe_layer_step", "nope_layer_interval", "attention_chunk_size", "use_qk_norm",  # Llama 4
    "attn_temperature_tuning", "floor_scale", "attn_scale",
)  # fmt: skip


def check_hf_config(hf_dir: Path, spec: ModelSpec, args) -> None:
    """Refuse a Hugging Face model of another family, or whose architecture differs from this run's flavor."""
    config = read_hf_config(hf_dir)
    family = family_of_hf_config(config, hf_dir / "config.json")
    if family != spec.name:
        raise CheckpointError(
            hf_dir, f"is a {family} model, this run's is {spec.name}", f"train with --model.name {family}"
        )
    theirs = hf_config_args(spec, config, hf_dir / "config.json")
    fields = [f for f in _ARCHITECTURE_FIELDS if hasattr(args, f)]  # the ones this model family has
    differences = [
        f"{f}: {getattr(theirs, f)} vs {getattr(args, f)}" for f in fields if getattr(theirs, f) != getattr(args, f)
    ]
    if differences:
        raise CheckpointError(
            hf_dir,
            f"does not match this run's model ({'; '.join(differences)})",
            "take its architecture with --model.flavor from_hf (without overrides that change it)",
        )
