"""Content checksums of checkpoint files, computed while DCP writes them.

A size check misses flipped bytes, so every data file gets an xxh3-128 digest. Hashing happens in the
writer's stream as the bytes go out (no second read of a multi-GB file); each rank writes a small
``<file>.xxh3`` sidecar next to each of its data files, and rank 0 folds the sidecars into the
manifest when it publishes, so no collective is needed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

ALGORITHM = "xxh3_128"
SIDECAR = ".xxh3"
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

    def write(self, data) -> int:
        started = time.perf_counter()
        self.hasher.update(data)
        self.clock[0] += time.perf_counter() - started
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
        Path(f"{path}{SIDECAR}").write_text(hashing.hasher.hexdigest())
        with self._lock:
            self.hash_seconds[0] += clock[0]


class ChecksumWriter(FileSystemWriter):
    """DCP's file writer, leaving an xxh3-128 sidecar beside each data file; `hash_seconds` is the
    time spent hashing (for the benchmark)."""

    def __init__(self, path: str | os.PathLike, **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.fs = _HashingFileSystem()

    @property
    def hash_seconds(self) -> float:
        return self.fs.hash_seconds[0]


def collect(folder: Path) -> dict[str, str]:
    """Fold the sidecars of a written checkpoint into {file: digest}, removing them; a data file whose
    sidecar is missing (written by another writer) is hashed from disk."""
    digests = {}
    for sidecar in folder.glob(f"*{SIDECAR}"):
        digests[sidecar.name.removesuffix(SIDECAR)] = sidecar.read_text().strip()
        sidecar.unlink()
    for path in sorted(folder.iterdir()):
        if path.name not in digests and path.name != "lockstep.json":
            digests[path.name] = file_digest(path)
    return dict(sorted(digests.items()))
