"""Training directly on text/json/parquet files: prepare them into the cache once per machine.

The cache entry is found by what a ``stat`` tells (the files' resolved paths, sizes and modification
times) and the tokenizer's fingerprint, so a start reads no data once the entry exists. The first local
rank to take the entry's lock (``fcntl.flock``, dropped by the kernel however its holder ends) prepares
it with the parallel machinery of ``lockstep data prepare``; the other ranks wait on the lock, then find
the manifest. So N ranks on a machine never tokenize the same files at once.

An entry is prepared in a sibling folder ``KEY.partial`` and renamed to ``KEY`` once its manifest is
written, so a folder under the entry's own name is always finished, whatever stopped a preparation (a
bad record, Ctrl-C, a kill, a full disk). Before anything else the partial folder gets a marker file
(``PARTIAL_MARKER``) naming the files and tokenizer it is for: the next start with the same inputs
resumes it (finished shards kept: their content is a pure function of the plan); a start on the same
files after they changed (a bad record fixed, say), which can never finish the old one, removes it in
one line. Only folders that hold the marker are ever removed, and only under their own lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from lockstep.data.cache import atomic_path, cache_root
from lockstep.data.prepare import PARTIAL_MARKER, prepare
from lockstep.data.prepared import FORMAT, MANIFEST, PLAN, VERSION
from lockstep.data.shard_plan import SHARD_BYTES, identity, plan_files
from lockstep.data.sources import DocumentSource
from lockstep.data.tokenizer import Tokenizer
from lockstep.errors import InputError

PARTIAL_SUFFIX = ".partial"


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
    owner = {"paths": [str(Path(f).resolve()) for f in source.files], "tokenizer": tokenizer.fingerprint}
    with machine_lock(root / f"{key}.lock"):
        if (folder / MANIFEST).is_file():  # another local rank prepared it while this one waited
            return folder, False
        partial = _partial_folder(root, key, owner, record["files"])
        result = prepare(
            record,
            tasks,
            str(Path(source.location).resolve()) if source.kind != "hf" else source.location,  # inspect finds the files
            tokenizer,
            partial,
            source_fingerprint=source_fingerprint,
            show_progress=sys.stderr.isatty(),
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        os.rename(partial, folder)
        (folder / PARTIAL_MARKER).unlink(missing_ok=True)
        if result.shards_written:
            print(f"lockstep: tokenized {source.location} into the cache: {result.summary()}", flush=True)
    return folder, True


def _partial_folder(root: Path, key: str, owner: dict, files: list) -> Path:
    """The marked folder to prepare entry `key` in: resumed if a start left it, else made. A folder of
    an older lockstep under the entry's own name with a plan but no manifest is moved there to resume;
    marked partial folders of the same files and tokenizer whose files have changed since are removed."""
    partial = root / f"{key}{PARTIAL_SUFFIX}"
    final = root / key
    if final.exists():
        if not (final / PLAN).is_file() or partial.exists():
            raise InputError(
                final, "is in lockstep's cache but is not a finished preparation",
                "remove it; the next start prepares the data again",
            )  # fmt: skip
        os.rename(final, partial)
    for other in sorted(root.glob(f"*{PARTIAL_SUFFIX}")):
        if other != partial:
            _remove_if_stale(other, owner, files)
    if not (partial / PARTIAL_MARKER).is_file():
        partial.mkdir(exist_ok=True)
        with atomic_path(partial / PARTIAL_MARKER) as tmp:
            tmp.write_text(json.dumps({**owner, "files": files}, indent=1))
    return partial


def _remove_if_stale(folder: Path, owner: dict, files: list) -> None:
    """Remove a marked partial folder for these same paths and tokenizer but other file sizes or times:
    its plan can never be finished. Skipped while another process prepares it (its lock is held)."""
    try:
        mark = json.loads((folder / PARTIAL_MARKER).read_text())
    except (OSError, ValueError):
        return  # no marker: not lockstep's partial output, or not readable; left alone
    if not isinstance(mark, dict) or {k: mark.get(k) for k in owner} != owner or mark.get("files") == files:
        return
    lock = folder.with_name(f"{folder.name.removesuffix(PARTIAL_SUFFIX)}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    else:
        shutil.rmtree(folder)
        print(f"lockstep: removed {folder}: an unfinished preparation of these files from before they changed",
              file=sys.stderr, flush=True)  # fmt: skip
    finally:
        os.close(fd)
