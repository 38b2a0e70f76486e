"""Content checksums of checkpoint files, computed while DCP writes them.

A size check misses flipped bytes, so every data file gets an xxh3-128 digest. Hashing happens in the
writer's stream as the bytes go out (no second read of a multi-GB file). Each rank's sizes and digests
travel with its DCP write results, which DCP already gathers on the coordinator to write ``.metadata``:
rank 0 publishes the manifest from them, with no collective of its own and no file per rank to read,
stat or fsync (at W ranks, rank 0's share of a save stays O(1) file operations, not O(W)).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import xxhash
from torch.distributed.checkpoint import FileSystemWriter, Metadata
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

ALGORITHM = "xxh3_128"
_CHUNK = 16 << 20


def file_digest(path: Path) -> str:
    """The digest of a file as stored on disk (read in 16 MiB chunks)."""
    hasher = xxhash.xxh3_128()
    buffer = memoryview(bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            hasher.update(buffer[:n])
    return hasher.hexdigest()


class _HashingStream:
    """A write-only file stream that hashes what passes through it (DCP writes sequentially and only
    asks for tell/flush/fileno besides write; a seek would invalidate the digest, so it is refused)."""

    def __init__(self, raw, clock: list[float]) -> None:
        self.raw = raw
        self.hasher = xxhash.xxh3_128()
        self.clock = clock
        self.size = 0

    def write(self, data) -> int:
        started = time.perf_counter()
        self.hasher.update(data)
        self.clock[0] += time.perf_counter() - started
        self.size += memoryview(data).nbytes
        return self.raw.write(data)

    def seek(self, *args):
        raise OSError("checkpoint streams are hashed as written and cannot seek")

    def seekable(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


class _HashingFileSystem(FileSystem):
    def __init__(self) -> None:
        super().__init__()
        self.hash_seconds = [0.0]
        self.written: dict[str, list] = {}
        """{file name: [size, digest]} of the data files this rank wrote."""
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator:
        if mode != "wb" or not str(path).endswith(".distcp"):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        clock = [0.0]
        with super().create_stream(path, mode) as stream:
            hashing = _HashingStream(stream, clock)
            yield hashing
        with self._lock:
            self.written[Path(path).name] = [hashing.size, hashing.hasher.hexdigest()]
            self.hash_seconds[0] += clock[0]


class WrittenFiles(list):
    """One rank's DCP write results, carrying ``files`` ({name: [size, digest]}) through DCP's gather."""

    files: dict[str, list]

    def __init__(self, results=(), files: dict[str, list] | None = None) -> None:
        super().__init__(results)
        self.files = dict(files or {})


class ChecksumWriter(FileSystemWriter):
    """DCP's file writer, hashing each data file as it is written; on the coordinator, after the save,
    ``files`` holds every rank's {name: [size, digest]}. `hash_seconds` is this rank's time spent
    hashing (for the benchmark)."""

    def __init__(self, path: str | os.PathLike, **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.fs = _HashingFileSystem()
        self.files: dict[str, list] = {}

    @property
    def hash_seconds(self) -> float:
        return self.fs.hash_seconds[0]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        return super().write_data(plan, planner).then(lambda done: WrittenFiles(done.value(), self.fs.written))

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        for result in results:
            self.files.update(getattr(result, "files", {}))
        super().finish(metadata, results)


def hash_unrecorded(folder: Path, recorded: dict[str, list]) -> dict[str, list]:
    """[size, digest] of every file in `folder` that `recorded` lacks (DCP's ``.metadata``, or a data
    file written by another writer), read from disk; the manifest is left out."""
    found = {}
    for path in sorted(folder.iterdir()):
        if path.name not in recorded and path.name != "lockstep.json":
            found[path.name] = [path.stat().st_size, file_digest(path)]
    return found
