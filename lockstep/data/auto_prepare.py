"""Training directly on text/json/parquet files: prepare them into the cache once per machine.

The cache entry is found by what a ``stat`` tells (the files' resolved paths, sizes and modification
times) and the tokenizer's fingerprint, so a start reads no data once the entry exists. The first local
rank to take the entry's lock (``fcntl.flock``, dropped by the kernel however its holder ends) prepares
it with the parallel machinery of ``lockstep data prepare``; the other ranks wait on the lock, then find
the manifest. So N ranks on a machine never tokenize the same files at once. An interrupted preparation
is resumed by the next start (finished shards kept).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from lockstep.data.cache import cache_root
from lockstep.data.prepare import prepare
from lockstep.data.prepared import FORMAT, MANIFEST, VERSION
from lockstep.data.shard_plan import SHARD_BYTES, identity, plan_files
from lockstep.data.sources import DocumentSource
from lockstep.data.tokenizer import Tokenizer
from lockstep.errors import InputError


@contextlib.contextmanager
def machine_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing; never removed, as unlinking a lock file
    races with a process about to lock it), waiting for the current holder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def prepare_cached(
    source: DocumentSource,
    tokenizer: Tokenizer,
    cache_folder: str = "",
    source_fingerprint: str | None = None,
    shard_bytes: int = SHARD_BYTES,
    nodes: int = 1,
) -> tuple[Path, bool]:
    """The prepared cache folder of `source` tokenized by `tokenizer`, and whether this call prepared it.
    A job of several `nodes` never tokenizes at start-up (each node would tokenize the whole corpus into
    its own cache, or several would write one shared cache): it uses an entry that exists, or is refused
    in one line with the ``lockstep data prepare`` command to run once before the launch."""
    record, tasks = plan_files(source, shard_bytes)
    key = identity(
        {
            "format": f"{FORMAT}-{VERSION}",
            "source": record,
            "paths": [str(Path(f).resolve()) for f in source.files],
            "tokenizer": tokenizer.fingerprint,
            "fingerprint": source_fingerprint,
            "shard_bytes": shard_bytes,
        }
    )[:32]
    root = cache_root(cache_folder) / "prepared"
    folder = root / key
    if (folder / MANIFEST).is_file():
        return folder, False
    if nodes > 1 and source.kind != "builtin":  # (the built-in corpus is a few MB: every machine tokenizes it)
        raise InputError(
            source.location, f"is not prepared, and this job spans {nodes} nodes: each would tokenize all of it",
            f"prepare it once before the launch (lockstep data prepare --dataset {source.kind} --dataset-path "
            f"{source.location} --tokenizer ... --out FOLDER), then train with --training.dataset prepared "
            "--training.dataset_path FOLDER",
        )  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    with machine_lock(root / f"{key}.lock"):
        if (folder / MANIFEST).is_file():  # another local rank prepared it while this one waited
            return folder, False
        result = prepare(
            record,
            tasks,
            str(Path(source.location).resolve()) if source.kind != "hf" else source.location,  # inspect finds the files
            tokenizer,
            folder,
            source_fingerprint=source_fingerprint,
            show_progress=sys.stderr.isatty(),
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        if result.shards_written:
            print(f"lockstep: tokenized {source.location} into the cache: {result.summary()}", flush=True)
    return folder, True
