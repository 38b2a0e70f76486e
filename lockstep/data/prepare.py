"""Prepare a dataset: tokenize its shards in parallel worker processes into a prepared folder.

Order of writes, so that an interrupted run can always be resumed and nothing lies: plan.json first
(the inputs, the tokenizer, the shard cuts), then the tokenizer files, then each shard (token file and
document index renamed into place, its record last), then, once every shard has a record, the manifest
(lockstep.data.finalize). A second run with the same plan skips the shards that have a record; a run
with another plan (other inputs, another tokenizer) is refused rather than mixing the two.

Workers are processes started with ``spawn`` (no fork of a process whose tokenizer or torch threads
already run). The `tokenizers` library parallelises ``encode_batch`` on its own thread pool, so each
worker's pool is sized to cores / workers: the two kinds of parallelism add up instead of contending.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import queue as queue_module
import socket
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from lockstep.data.cache import atomic_path
from lockstep.data.finalize import finalize
from lockstep.data.prepared import (
    BYTES_MARKER,
    FORMAT,
    MANIFEST,
    PLAN,
    PLAN_SHAPE,
    SHARDS,
    TOKENIZER_CONFIG,
    TOKENIZER_FILE,
    VERSION,
    done_record,
    read_json,
    token_dtype,
)
from lockstep.data.shard_plan import ShardTask
from lockstep.data.shard_writer import init_worker, run_task, write_shard
from lockstep.data.tokenizer import BytesTokenizer, HFTokenizer, Tokenizer
from lockstep.errors import InputError

Log = Callable[[str], None]
_INLINE_BYTES = 4 << 20
"""Inputs smaller than this are tokenized in this process by default (the tokenizer's own threads)."""


@dataclass
class PrepareResult:
    folder: Path
    status: str
    """prepared, already prepared, or job done (a job of several: finalize once all are done)."""
    shards_written: int
    shards_total: int
    input_bytes: int
    tokens_written: int
    seconds: float
    workers: int
    tokenizer_threads: int

    def summary(self) -> str:
        rate = self.input_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
        tokens = self.tokens_written / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.folder}: {self.status}; wrote {self.shards_written} of {self.shards_total} shards, "
            f"{self.input_bytes / 1e6:.1f} MB -> {self.tokens_written} tokens in {self.seconds:.1f} s "
            f"({rate:.2f} MB/s, {tokens:,.0f} tokens/s; {self.workers} workers x {self.tokenizer_threads} "
            "tokenizer threads)"
        )


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tokenizer_record(tokenizer: Tokenizer, name: str = "") -> dict:
    """What the plan and manifest record of the tokenizer (its fingerprint decides compatibility)."""
    if isinstance(tokenizer, BytesTokenizer):
        kind = "bytes"
    elif isinstance(tokenizer, HFTokenizer):
        kind = "hf"
    else:
        raise TypeError(f"cannot prepare with a {type(tokenizer).__name__}: a BytesTokenizer or HFTokenizer is needed")
    return {
        "kind": kind,
        "name": name or kind,
        "fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }


def make_plan(source: dict, tasks: list[ShardTask], tokenizer: dict, location: str, fingerprint: str | None) -> dict:
    """plan.json: everything that decides the shards' content. `fingerprint` overrides the source
    fingerprint finalize would compute (the built-in corpus has its own sha256)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": token_dtype(tokenizer["vocab_size"]).name,
        "tokenizer": tokenizer,
        "source": {**source, "fingerprint": fingerprint},
        "location": location,
        "shards": [task.record() for task in tasks],
    }


def _comparable(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if k != "location"}  # where the inputs lie may change


def _difference(old: dict, new: dict) -> str:
    if old.get("source", {}).get("files") != new["source"]["files"]:
        return "other inputs (file names, sizes or modification times differ)"
    if old.get("tokenizer") != new["tokenizer"]:
        return f"another tokenizer ({old.get('tokenizer', {}).get('name')})"
    return "other settings (text field, split, shard cuts or format)"


def _claim(out: Path, plan: dict) -> bool:
    """Create the folder with its plan, or accept one holding this same plan; True when it is finished
    already. Refuses anything else, so nothing in `out` is overwritten."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out is a file", "pass a folder")
    plan_file = out / PLAN
    if plan_file.is_file():
        existing = read_json(plan_file, PLAN_SHAPE)
        if _comparable(existing) != _comparable(plan):
            raise InputError(
                out,
                f"holds a preparation of {_difference(existing, plan)}",
                "pass another --out, or remove that folder to prepare it again",
            )
        return (out / MANIFEST).is_file()
    if out.is_dir() and any(
        not p.name.startswith((f"{PLAN}.tmp", JOB_LOCK_PREFIX, PARTIAL_MARKER)) for p in out.iterdir()
    ):
        raise InputError(
            out, "is not empty and holds no lockstep preparation (no plan.json)", "pass a new or empty --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(plan_file) as tmp:
        tmp.write_text(json.dumps(plan, indent=1))
    return False


def _write_tokenizer(out: Path, tokenizer: Tokenizer) -> None:
    """The folder's own tokenizer: a copy of the tokenizer.json (and its tokenizer_config.json), or a marker."""
    if isinstance(tokenizer, BytesTokenizer):
        marker = out / BYTES_MARKER
        if not marker.is_file():
            with atomic_path(marker) as tmp:
                tmp.write_text("lockstep bytes tokenizer: UTF-8 bytes as ids 0..255, BOS 256, EOS 257\n")
        return
    target = out / TOKENIZER_FILE
    if not (target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == tokenizer.fingerprint):
        with atomic_path(target) as tmp:
            tmp.write_bytes(tokenizer.path.read_bytes())
    config = tokenizer.path.parent / TOKENIZER_CONFIG
    if config.is_file() and not (out / TOKENIZER_CONFIG).is_file():
        with atomic_path(out / TOKENIZER_CONFIG) as tmp:
            tmp.write_bytes(config.read_bytes())


def prepare(
    source: dict,
    tasks: list[ShardTask],
    location: str,
    tokenizer: Tokenizer,
    out: Path,
    *,
    tokenizer_name: str = "",
    workers: int = 0,
    tokenizer_threads: int = 0,
    num_jobs: int = 1,
    job_index: int = 0,
    source_fingerprint: str | None = None,
    show_progress: bool = True,
    log: Log = print,
) -> PrepareResult:
    """Prepare job `job_index` of `num_jobs` (shard k belongs to job k mod num_jobs) into `out`; a lone
    job finalizes. `workers` 0 = one per core (at most one per shard), `tokenizer_threads` 0 = cores / workers."""
    out = Path(out)
    plan = make_plan(source, tasks, tokenizer_record(tokenizer, tokenizer_name), location, source_fingerprint)
    started = time.perf_counter()
    finished = _claim(out, plan)
    mine = tasks[job_index::num_jobs]
    if finished:
        return PrepareResult(out, "already prepared", 0, len(mine), 0, 0, 0.0, 0, 0)
    with _job_lock(out, job_index, num_jobs):
        return _prepare_job(out, plan, mine, tokenizer, workers, tokenizer_threads, num_jobs, job_index, show_progress,
                            log, started)  # fmt: skip


JOB_LOCK_PREFIX = ".prepare-job-"
PARTIAL_MARKER = ".lockstep-partial.json"
"""Marks a cache folder as lockstep's own unfinished preparation (lockstep.data.auto_prepare), which it may remove."""


@contextlib.contextmanager
def _job_lock(out: Path, job_index: int, num_jobs: int):
    """One process per job of a folder: two identical prepares at once would write the same shards, and
    one's finalize would delete the other's in-flight files. An OS lock (``fcntl.flock``, dropped by the
    kernel however its holder exits) on a file per job; a second holder is refused in one line."""
    path = out / f"{JOB_LOCK_PREFIX}{job_index}-of-{num_jobs}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise InputError(
                out, f"is being prepared by another lockstep data prepare (job {job_index} of {num_jobs}, {holder})",
                "wait for it to finish, or stop it (its finished shards are kept) and run the command again",
            ) from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_job(
    out: Path, plan: dict, mine: list[ShardTask], tokenizer: Tokenizer, workers: int, tokenizer_threads: int,
    num_jobs: int, job_index: int, show_progress: bool, log: Log, started: float,
) -> PrepareResult:  # fmt: skip
    """The rest of ``prepare``, holding this job's lock."""
    dtype = np.dtype(plan["dtype"])
    _write_tokenizer(out, tokenizer)
    (out / SHARDS).mkdir(exist_ok=True)
    todo = [t for t in mine if done_record(out, t.name, dtype) is None]
    if len(todo) < len(mine):
        log(f"{out}: {len(mine) - len(todo)} of {len(mine)} shards of this job are done already; preparing the rest")
    cores = available_cores()
    if not workers:  # one per core and shard, and none for small inputs (starting one costs about 0.3 s)
        small = sum(t.input_bytes for t in todo) < _INLINE_BYTES
        workers = 1 if small else max(1, min(cores, len(todo)))
    threads = tokenizer_threads or max(1, cores // workers)
    records = _run(todo, out, tokenizer, dtype, workers, tokenizer_threads, show_progress)
    seconds = time.perf_counter() - started
    input_bytes = sum(t.input_bytes for t in todo)
    tokens = sum(r["tokens"] for r in records)
    if num_jobs == 1:
        finalize(out, log)
        status = "prepared"
    else:
        status = f"job {job_index} of {num_jobs} done (run lockstep data finalize {out} once every job is done)"
    return PrepareResult(out, status, len(records), len(mine), input_bytes, tokens, seconds, workers, threads)


def _progress_bar(show: bool, total: int):

    progress = Progress(
        TextColumn("tokenizing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show,
    )
    return progress, progress.add_task("tokenizing", total=total)


def _run(
    todo: list[ShardTask],
    out: Path,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    workers: int,
    tokenizer_threads: int,
    show_progress: bool,
) -> list[dict]:
    """Write the shards: inline with the tokenizer's own threads (one worker, threads not set), else in
    `workers` spawned processes with `tokenizer_threads` (default cores / workers) each."""
    if not todo:
        return []
    progress, bar = _progress_bar(show_progress, sum(t.input_bytes for t in todo))
    with progress:
        if (workers == 1 and not tokenizer_threads) or multiprocessing.current_process().daemon:  # no children
            return [write_shard(out, t, tokenizer, dtype, lambda n: progress.advance(bar, n)) for t in todo]
        threads = tokenizer_threads or max(1, available_cores() // workers)
        context = multiprocessing.get_context("spawn")
        reports = context.Queue()
        kind = "bytes" if isinstance(tokenizer, BytesTokenizer) else "hf"
        pool = ProcessPoolExecutor(
            workers, context, initializer=init_worker, initargs=(threads, reports, str(out), kind, dtype.name)
        )
        records = []
        try:
            pending = {pool.submit(run_task, t) for t in todo}
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(reports, lambda n: progress.advance(bar, n))
                records.extend(f.result() for f in done)  # a worker's error is raised here
        except BrokenProcessPool as e:
            raise RuntimeError(
                "a preparation worker died (killed, or out of memory); the finished shards are kept: "
                "run the same command again to resume"
            ) from e
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        _drain(reports, lambda n: progress.advance(bar, n))
        return sorted(records, key=lambda r: r["name"])


def _drain(reports, advance: Callable[[int], None]) -> None:
    while True:
        try:
            advance(reports.get_nowait())
        except queue_module.Empty:
            return
