"""Signals and kills against real processes (benchmark only: each starts torchrun or worker pools).

Every case is a `lockstep` subprocess whose descendants carry the harness marker, so the harness finds
any that outlive it however they were re-parented. Exit codes: 75 stopped by a signal after saving,
76 stopped with nothing saved; a launcher whose rank was killed exits non-zero with a short message."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.helpers import tiny_overrides
from tests.hostile.fixtures import Fixtures, documents
from tests.hostile.harness import Case, Outcome, poll_until

STARTUP_S = 240.0
"""torchrun and two workers importing torch on two cores, then one step."""
MAX_LINES = 5
"""A launcher's message about a dead rank is short: its stderr has at most this many lines."""


def _endless(work: Path, *extra: str) -> list[str]:
    """The tiny run with a step count it never reaches: only a signal ends it."""
    return ["train", "--config", "llama3_debug", *tiny_overrides(work), "--training.steps", "100000", *extra]


def _nproc2(work: Path, *extra: str) -> list[str]:
    return _endless(work, "--nproc", "2", *extra)


def _after_first_step(send: Callable[[subprocess.Popen], None]) -> Callable[[subprocess.Popen, Path], None]:
    """Wait (bounded) until step 1 is logged in work/run/metrics.jsonl, then `send`."""

    def drive(process: subprocess.Popen, work: Path) -> None:
        metrics = work / "run" / "metrics.jsonl"
        started = poll_until(lambda: process.poll() is not None or (metrics.is_file() and metrics.stat().st_size > 0),
                             STARTUP_S, interval_s=0.2)  # fmt: skip
        if started and process.poll() is None:
            _count_descendants(process, work)
            send(process)

    return drive


SEEN = "processes-at-signal"
"""Written by a drive: how many descendants the process had when it was signalled."""


def _count_descendants(process: subprocess.Popen, work: Path) -> None:
    with contextlib.suppress(psutil.Error):
        (work / SEEN).write_text(str(len(psutil.Process(process.pid).children(recursive=True))))


def _had_workers(least: int) -> Callable[[Path, Outcome], list[str]]:
    """The case proves something only if the workers it is about existed when the signal came."""

    def check(work: Path, outcome: Outcome) -> list[str]:
        seen = int((work / SEEN).read_text()) if (work / SEEN).is_file() else 0
        return [] if seen >= least else [f"only {seen} descendant(s) when signalled (expected {least}): proves nothing"]

    return check


def _both(*checks: Callable[[Path, Outcome], list[str]]) -> Callable[[Path, Outcome], list[str]]:
    return lambda work, outcome: [p for check in checks for p in check(work, outcome)]


def _signal(number: int) -> Callable[[subprocess.Popen], None]:
    return lambda process: process.send_signal(number)


def _kill_rank_one(process: subprocess.Popen) -> None:
    """SIGKILL the worker whose environment says RANK=1."""
    for child in psutil.Process(process.pid).children(recursive=True):
        with contextlib.suppress(OSError, psutil.Error):
            if b"RANK=1" in Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0"):
                child.kill()
                return


def _saved(work: Path, outcome: Outcome) -> list[str]:
    published = [p for p in (work / "run" / "checkpoint").glob("step-*") if (p / "lockstep.json").is_file()]
    return [] if published else ["exit 75 promises a saved checkpoint; none was published"]


def _nothing_saved(work: Path, outcome: Outcome) -> list[str]:
    return ["a checkpoint was saved with checkpointing off"] if (work / "run" / "checkpoint").exists() else []


def _short(work: Path, outcome: Outcome) -> list[str]:
    lines = outcome.stderr.splitlines()
    return [] if len(lines) <= MAX_LINES else [f"the launcher printed {len(lines)} stderr lines (at most {MAX_LINES})"]


def _big_corpus(work: Path, fx: Fixtures) -> list[str]:
    """About 100 MB of JSON Lines: long enough (with two workers) to be stopped half-way."""
    block = "".join(json.dumps({"text": d}) + "\n" for d in documents(2000, seed=1)).encode()
    path = work / "big.jsonl"
    with open(path, "wb") as f:
        for _ in range(100_000_000 // len(block) + 1):
            f.write(block)
    return ["data", "prepare", "--dataset", "json", "--dataset-path", path, "--tokenizer", "bytes", "--out",
            work / "prepared", "--workers", "2", "--shard-mb", "2", "--no-progress"]  # fmt: skip


def _when_shards_start(process: subprocess.Popen, work: Path) -> None:
    poll_until(lambda: process.poll() is not None or any((work / "prepared" / "shards").glob("*.json")),
               STARTUP_S, interval_s=0.1)  # fmt: skip
    if process.poll() is None:
        _count_descendants(process, work)
        process.send_signal(signal.SIGTERM)


KILLED = frozenset({-signal.SIGKILL})
STOPPED_BY_TERM = frozenset({-signal.SIGTERM, 1, 130, 143})
"""data prepare under SIGTERM: killed by it, or interrupted (130); either way no worker may survive."""
FAILED = frozenset({1, 2, 134, -signal.SIGABRT, -signal.SIGKILL})


def cases() -> list[Case]:
    def case(name: str, build, expect: frozenset[int], drive, check=None) -> Case:
        return Case(id=f"signal-{name}", group="signals", build=build, expect=expect, fast=False, subprocess=True,
                    timeout_s=420.0,
                    check=check, drive=drive)  # fmt: skip

    checkpointing = ("--checkpoint.enable", "--checkpoint.interval", "100000")
    ranks = _had_workers(2)
    return [
        case("sigkill-launcher-nproc2", lambda w, fx: _nproc2(w), KILLED, _after_first_step(_signal(signal.SIGKILL)),
             ranks),
        case("sighup-nproc2-checkpointing", lambda w, fx: _nproc2(w, *checkpointing), frozenset({75}),
             _after_first_step(_signal(signal.SIGHUP)), _both(ranks, _saved)),
        case("sighup-nproc2-no-checkpointing", lambda w, fx: _nproc2(w), frozenset({76}),
             _after_first_step(_signal(signal.SIGHUP)), _both(ranks, _nothing_saved)),
        case("sigint-nproc2-checkpointing", lambda w, fx: _nproc2(w, *checkpointing), frozenset({75}),
             _after_first_step(_signal(signal.SIGINT)), _both(ranks, _saved)),
        case("sigterm-one-process-checkpointing", lambda w, fx: _endless(w, *checkpointing), frozenset({75}),
             _after_first_step(_signal(signal.SIGTERM)), _saved),
        case("sigkill-rank1-nproc2", lambda w, fx: _nproc2(w), FAILED, _after_first_step(_kill_rank_one),
             _both(ranks, _short)),
        case("sigterm-data-prepare", _big_corpus, STOPPED_BY_TERM, _when_shards_start, _had_workers(1)),
    ]  # fmt: skip
