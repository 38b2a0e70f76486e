"""Reading a DCP checkpoint without ever running code from it, verifying its checksums as it reads.

DCP pickles in two places: the ``.metadata`` file (read with ``pickle.load``) and every non-tensor
item in the ``.distcp`` data files (train state, loader position, RNG, scheduler, optimizer
param_groups), which DCP's default load planner reads with ``torch.load(weights_only=False)``. A
crafted checkpoint could run code through either. Here the metadata is unpickled by an allow-list of
the classes DCP's metadata is made of (nothing callable beyond them), and every non-tensor item by
``torch.load(weights_only=True)``; tensors DCP itself reads with ``weights_only=True``.
``SafeFileSystemReader`` refuses any planner but ``SafeLoadPlanner``, so no load can bypass this.
A refused item raises CheckpointError naming the checkpoint, the file and the item.

The manifest's xxh3-128 checksums (format 2) are verified during the load itself, not by a second
read: DCP's global planning step gives every file to exactly one rank (the one that reads the most
of it; a file no rank reads goes to file index % world size), which reads that file whole in one
sequential pass in offset order, hashing every byte (the gaps between its items included) and
serving its items from what it read; the other ranks that need the file read only their items. A
mismatch raises CheckpointError naming the checkpoint and the file once the file has been read
through; DCP's read step gathers every rank's failure, so all ranks raise it together. The
``.metadata`` file is hashed as it is read and checked by the coordinator before any data is read.
Format-1 checkpoints (no checksums) and folders without a manifest are read unverified.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
import re
import time
from collections import Counter
from pathlib import Path

import torch
import xxhash
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from lockstep.checkpoint.errors import CheckpointError, CheckpointMismatch
from lockstep.checkpoint.manifest import read_manifest

_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("pathlib", "PosixPath"),
    ("torch.serialization", "_get_layout"),
}
_TORCH_VALUE_TYPES = (torch.dtype, torch.memory_format, torch.layout)
_FIX = "delete or move this checkpoint folder; lockstep does not load it"
_UNSAFE_ITEM = (
    pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, AssertionError,
)  # fmt: skip
"""What an item that is not what its metadata says raises on the way in (the allow-listed unpickler, an
unknown transform, a record cut short, a tensor of another size); resource errors are not among them."""
_CHUNK = 16 << 20


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # No dotted names: pickle would walk attributes (module "…filesystem", name "os.system").
        if "." not in name:
            if (module, name) in _ALLOWED:
                return super().find_class(module, name)
            if module in _METADATA_MODULES:
                found = super().find_class(module, name)
                if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                    return found
            if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUE_TYPES):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which lockstep does not load")


def load_metadata_safely(raw: bytes) -> Metadata:
    metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"checkpoint metadata is a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def load_value_safely(raw: bytes):
    """A non-tensor item (plain Python values, possibly tensors) through torch's allow-list unpickler;
    weights_only=True is explicit, so no environment variable can turn it off."""
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not a plain value we wrote
        named = re.search(r"GLOBAL (\S+)", str(e))
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        first = (unpickler.group(1) if unpickler else str(e)).strip().splitlines()[0][:200]
        reason = f"it refers to {named.group(1)}" if named else first
        raise pickle.UnpicklingError(f"refused to unpickle ({reason})") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor items are unpickled by the allow-list loader, and a
    tensor the checkpoint lacks or holds in another shape is one line naming it (a model whose shape
    changed cannot be loaded, --checkpoint.ignore_mismatch or not)."""

    def __init__(self, *args, folder: str = "checkpoint", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.folder = folder

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata
        fix = "resume with the model it was saved with, or start a new run in another job.dump_folder"
        for fqn, value in self.state_dict.items():
            if fqn not in stored:
                if self.allow_partial_load:
                    continue
                raise CheckpointMismatch(f"{self.folder} holds no {fqn}, which this run's model has; {fix}")
            meta = stored[fqn]
            if isinstance(value, torch.Tensor) and isinstance(meta, TensorStorageMetadata):
                if tuple(meta.size) != tuple(value.size()):
                    raise CheckpointMismatch(
                        f"{self.folder} holds {fqn} of shape {list(meta.size)}; this run's is {list(value.size())}; {fix}"
                    )
        return super().create_local_plan()

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.load_value(read_item, load_value_safely(value.getvalue()))

    def load_value(self, read_item: ReadItem, value) -> None:
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value


class _Guard:
    """Stands in for the planner during read_data, so a refused item names its file and item."""

    def __init__(self, planner: SafeLoadPlanner, reader: SafeFileSystemReader) -> None:
        self._planner = planner
        self._reader = reader

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = load_value_safely(value.getvalue())
        except pickle.UnpicklingError as e:
            file = self._reader.storage_data[read_item.storage_index].relative_path
            problem = f"file {file}, item {read_item.storage_index.fqn}: {e}"
            raise CheckpointError(self._reader.path, problem, _FIX) from None
        self._planner.load_value(read_item, loaded)

    def __getattr__(self, name: str):
        return getattr(self._planner, name)


class _FilePass:
    """Reads the byte ranges of one file in offset order; with `hasher`, also hashes every byte from
    the start of the file to its end (gaps between the ranges read in 16 MiB chunks), so the digest
    is that of the whole file. `verify_seconds` counts what only verification costs: hashing and
    reading the gaps."""

    def __init__(self, f, hasher) -> None:
        self.f = f
        self.hasher = hasher
        self.position = 0  # hashed up to here
        self.verify_seconds = 0.0

    def read(self, offset: int, length: int) -> bytes:
        if self.hasher is not None and offset > self.position:
            self._hash_until(offset)
        self.f.seek(offset)
        data = self.f.read(length)
        while len(data) < length and (more := self.f.read(length - len(data))):
            data += more  # a short read (> 2 GiB items)
        if self.hasher is not None and offset + len(data) > self.position:
            started = time.perf_counter()
            self.hasher.update(memoryview(data)[max(0, self.position - offset) :])
            self.verify_seconds += time.perf_counter() - started
            self.position = offset + len(data)
        return data

    def digest(self) -> str:
        self._hash_until(None)
        return self.hasher.hexdigest()

    def _hash_until(self, end: int | None) -> None:
        started = time.perf_counter()
        self.f.seek(self.position)
        chunk = memoryview(bytearray(_CHUNK))
        while end is None or self.position < end:
            want = _CHUNK if end is None else min(_CHUNK, end - self.position)
            n = self.f.readinto(chunk[:want])
            if not n:
                break
            self.hasher.update(chunk[:n])
            self.position += n
        self.verify_seconds += time.perf_counter() - started


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader through the pickle allow-list, verifying the manifest's checksums while it
    reads (see the module docstring); `verify_seconds` is this rank's time spent only on that."""

    def __init__(self, path, verify: bool = True) -> None:
        super().__init__(path)
        self.verify = verify
        self.verify_seconds = 0.0
        self._metadata_digest: str | None = None
        self._metadata: dict[object, Metadata] = {}

    def read_metadata(self, *args, **kwargs) -> Metadata:
        """The checkpoint's metadata, read and checked once per reader: it lists every rank's chunks, so
        at W ranks it is O(W) in size, and each rank reads it (DCP's load asks for it again)."""
        rank = kwargs.get("rank")
        if rank not in self._metadata:
            self._metadata[rank] = self._read_metadata(rank)
        return self._metadata[rank]

    def _read_metadata(self, rank: int | None) -> Metadata:
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as stream:
            raw = stream.read()
        self._metadata_digest = xxhash.xxh3_128(raw).hexdigest()
        try:
            metadata = load_metadata_safely(raw)
        except Exception as e:  # garbage pickles raise KeyError, MemoryError, ...: all mean "damaged"
            raise CheckpointError(self.path, f"file {Path(path).name}: {type(e).__name__}: {e}", _FIX) from None
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", "")
            if not name or "/" in name or name.startswith("."):
                raise CheckpointError(
                    self.path, f"file .metadata names a data file outside the folder ({name!r})", _FIX
                )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """On the coordinator: check the metadata's checksum, and hand each rank the files it verifies
        ({file: digest} in its plan's storage_data, which the file reader leaves unused)."""
        digests = self._checksums()
        if not digests:
            return plans
        if ".metadata" in digests and self._metadata_digest not in (None, digests[".metadata"]):
            raise self._mismatch(".metadata")
        wanted = [Counter() for _ in plans]  # bytes each rank reads from each file
        for counter, plan in zip(wanted, plans, strict=True):
            for index in {item.storage_index for item in plan.items}:
                info = self.storage_data[index]
                counter[info.relative_path] += info.length
        shares: list[dict[str, str]] = [{} for _ in plans]
        for i, (name, digest) in enumerate(sorted(digests.items())):
            if name == ".metadata":
                continue
            readers = [(counter[name], -rank) for rank, counter in enumerate(wanted) if counter[name]]
            rank = -max(readers)[1] if readers else i % len(plans)
            shares[rank][name] = digest
        return [dataclasses.replace(plan, storage_data=share) for plan, share in zip(plans, shares, strict=True)]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        if not isinstance(planner, SafeLoadPlanner):
            raise TypeError("SafeFileSystemReader reads only with SafeLoadPlanner (pass planner=SafeLoadPlanner())")
        guard = _Guard(planner, self)
        to_verify: dict[str, str] = plan.storage_data if isinstance(plan.storage_data, dict) else {}
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name in sorted(set(per_file) | set(to_verify)):
            self._read_file(name, per_file.get(name, []), to_verify.get(name), guard)
        done: Future = Future()
        done.set_result(None)
        return done

    def _read_file(self, name: str, items: list[ReadItem], digest: str | None, planner) -> None:
        """Serve `items` from file `name` in offset order; with `digest`, read the whole file and
        compare. A checksum mismatch is reported rather than any error its damage caused on the way."""
        by_range: dict[tuple[int, int], list[ReadItem]] = {}
        for item in items:
            info = self.storage_data[item.storage_index]
            by_range.setdefault((info.offset, info.length), []).append(item)
        failure: BaseException | None = None
        with open(Path(self.path) / name, "rb", buffering=0) as f:
            reading = _FilePass(f, xxhash.xxh3_128() if digest else None)
            for (offset, length), requests in sorted(by_range.items()):
                data = reading.read(offset, length)
                if failure is None:  # after a failure, only hash the rest
                    try:
                        for request in requests:
                            self._serve(request, data, planner)
                    except Exception as e:  # noqa: BLE001 - re-raised below unless the checksum explains it
                        if digest is None:
                            raise self._unloadable(name, e) if isinstance(e, _UNSAFE_ITEM) else e from None
                        failure = e
            if digest is not None:
                actual = reading.digest()
                self.verify_seconds += reading.verify_seconds
                if actual != digest:
                    raise self._mismatch(name)
        if failure is not None:
            raise self._unloadable(name, failure) if isinstance(failure, _UNSAFE_ITEM) else failure

    def _unloadable(self, name: str, error: BaseException) -> CheckpointError:
        """An item that fails safe loading (a pickle where a tensor should be, an unknown transform, a
        truncated record) while its file matches its checksum: the checkpoint is set aside like a damaged
        one, in one line, not a traceback."""
        return CheckpointError(
            self.path, f"file {name} holds an item that does not load safely ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''})", _FIX,
        )  # fmt: skip

    def _serve(self, request: ReadItem, data: bytes, planner) -> None:
        """One item from its stored bytes, as DCP's FileSystemReader.read_data does."""
        info = self.storage_data[request.storage_index]
        stream = self.transforms.transform_load_stream(request, info.transform_descriptors or (), io.BytesIO(data))
        if request.type == LoadItemType.BYTE_IO:
            planner.load_bytes(request, io.BytesIO(stream.read(-1)))
            return
        seekable = stream if stream.seekable() else io.BytesIO(stream.read(-1))
        tensor = torch.load(seekable, map_location="cpu", weights_only=True)
        tensor = narrow_tensor_by_index(tensor, request.storage_offsets, request.lengths)
        target = planner.resolve_tensor(request).detach()
        if target.size() != tensor.size():
            raise AssertionError(f"req {request.storage_index} mismatch sizes {target.size()} vs {tensor.size()}")
        target.copy_(tensor)
        planner.commit_tensor(request, target)

    def _checksums(self) -> dict[str, str]:
        """{file: xxh3-128} from the manifest; empty when not verifying, for format 1 or without one."""
        manifest = Path(self.path) / "lockstep.json"
        if not self.verify or not manifest.is_file():
            return {}
        try:
            return dict(read_manifest(Path(self.path)).get("checksums") or {})
        except OSError:
            return {}  # an unreadable manifest is folders.problem_with's to report
        except ValueError as e:  # a crafted one: its names could point outside the folder
            raise CheckpointError(self.path, f"damaged checkpoint: {e}", _FIX) from None

    def _mismatch(self, name: str) -> CheckpointError:
        return CheckpointError(
            self.path, f"file {name} does not match its checksum (its content changed after saving)", _FIX
        )


def unsafe_item(folder: Path) -> str | None:
    """Why `folder`'s metadata or one of its non-tensor items would not load safely, or None. These
    items are small (counters, RNG, param_groups), so checking them all costs little."""
    reader = SafeFileSystemReader(str(folder))
    try:
        metadata = reader.read_metadata()
    except CheckpointError as e:
        return e.problem
    per_file: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            per_file.setdefault(info.relative_path, []).append((info.offset, info.length, index.fqn))
    for name, items in per_file.items():
        try:
            with open(folder / name, "rb") as f:
                for offset, length, fqn in sorted(items):
                    f.seek(offset)
                    try:
                        load_value_safely(f.read(length))
                    except Exception as e:  # refused by the allow-list, or simply damaged
                        return f"file {name}, item {fqn}: {e}"
        except OSError as e:
            return f"file {name} named by .metadata cannot be read ({e.strerror})"
    return None
