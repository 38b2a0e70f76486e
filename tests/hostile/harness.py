"""One hostile case, run and judged by the contract every case shares (issue 25).

A case passes when no exception escapes ``lockstep.cli.main`` (one would be a traceback for the user),
the exit code is one the case documents, a refusal (exit 2) is exactly one stderr line
``lockstep COMMAND: error: ...``, nothing prints "Traceback", no file the case may only read (the
fixtures and the sentinel folder) changed, and no process it started outlives it. In-process runs are
fast; the subprocess variant is what a user sees: real streams and exit code, and every descendant found
afterwards by a marker variable in its environment, whoever its parent is by then.

Python warnings count only in the subprocess variant: which ones a process shows depends on filters
that lockstep installs when its modules are first imported, and in-process those filters belong to
whichever test imported the module first (pytest discards them with that test's warning context).
In-process runs record warnings and drop them; the subprocess cases see them as a user would.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import resource
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

import psutil

from tests.helpers import WarningRecords

if TYPE_CHECKING:
    from tests.hostile.fixtures import Fixtures

REPO = Path(__file__).resolve().parents[2]
LOCKSTEP = Path(sys.executable).with_name("lockstep")
MARKER = "LOCKSTEP_HOSTILE_CASE"
REFUSED = frozenset({2})
REFUSED_OR_FELL_BACK = frozenset({0, 2})
"""A damaged checkpoint step is set aside for an older complete one (exit 0), or refused in one line."""
MAX_LINE = 2000
"""Longer than this, an error "line" is a dump (a 100,000-deep value echoed back), not a message."""
MEMORY_LIMIT = 8 << 30
"""Address space of a subprocess case: a read of /dev/zero ends in MemoryError, not in the OOM killer."""
MEMORY_BUDGET = 6 << 30
"""Address space an in-process case may add to the test process (a soft limit, lifted afterwards): an
absurd number that makes lockstep allocate for real (2**63 microbatches) fails there with MemoryError
instead of the kernel killing the whole suite."""
SUBPROCESS_TIMEOUT_S = 30.0
"""A real process that reads a damaged file: start-up (torch) and a refusal take seconds; a read of a FIFO
or of /dev/zero never ends, and this bounds it."""
JOIN_S = 20.0
"""How long processes that are exiting get to finish before they count as left behind."""
_LAUNCHER = "lockstep.cli.launch.launch_torchrun"
_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
"""Per-interpreter helpers that live as long as the test process, not the command (a real
``lockstep`` process takes them with it when it exits)."""


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What one run of a command did, as the harness saw it."""

    argv: list[str]
    code: int | None
    stdout: str
    stderr: str
    seconds: float
    escaped: str = ""
    """The traceback of an exception that left main (in-process) or was killed by the timeout."""
    hung: bool = False
    changed: list[str] = field(default_factory=list)
    leftover: list[str] = field(default_factory=list)
    state: list[str] = field(default_factory=list)
    """Process-wide state an in-process run left changed (working directory, handlers, process group)."""


@dataclass(frozen=True, kw_only=True)
class Case:
    """One hostile input: `build` writes the tampered copy into the case's own folder and returns the
    argv of ``lockstep``; `expect` holds the documented exit codes."""

    id: str
    group: str
    build: Callable[[Path, Fixtures], list[str]]
    expect: frozenset[int] = REFUSED
    fast: bool = True
    subprocess: bool = False
    timeout_s: float = 120.0
    check: Callable[[Path, Outcome], list[str]] | None = None
    """Extra problems (a payload that ran, a checkpoint that should have been saved)."""
    drive: Callable[[subprocess.Popen, Path], None] | None = None
    """For subprocess cases: what happens to the process while it runs (signals)."""
    launches: bool = True
    """False: torchrun is replaced by a stand-in that returns 0, so an in-process case sees what the
    launcher's checks accept (exit 0) or refuse without starting N processes."""


@dataclass(frozen=True)
class Verdict:
    case: Case
    outcome: Outcome
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def raised_at(self) -> str:
        """The innermost lockstep frame of an escaped exception (``lockstep/x.py:123``), or ""."""
        frames = re.findall(r'File "[^"]*/(lockstep/[^"]+)", line (\d+)', self.outcome.escaped)
        return f"{frames[-1][0]}:{frames[-1][1]}" if frames else ""

    def describe(self) -> str:
        """The failure message: which case, the command, what it printed first and last, every problem."""
        o = self.outcome
        lines = (o.stderr.strip() or o.stdout.strip()).splitlines() or ["(nothing printed)"]
        shown = [lines[0][:300]] + ([lines[-1][:300]] if len(lines) > 1 else [])
        return "\n".join(
            [
                f"case {self.case.id} ({self.case.group}): exit {o.code}, expected {sorted(self.case.expect)}",
                f"  command: lockstep {shlex.join(o.argv)}",
                *(f"  printed: {line}" for line in shown),
                *(f"  problem: {p}" for p in self.problems),
                *([f"  raised at: {self.raised_at}"] if self.raised_at else []),
                *(["  escaped:", *("    " + t for t in o.escaped.strip().splitlines()[-6:])] if o.escaped else []),
            ]
        )


class CaseTimeout(BaseException):
    """Raised into the main thread by the harness alarm; a BaseException so no `except Exception` in
    lockstep swallows it."""


# --- what a case may not change ------------------------------------------------------------------


_digests: dict[tuple, str] = {}
"""sha256 by (path, inode, size, mtime_ns, ctime_ns): any write changes ctime, so a file whose stat is
unchanged is not read again (the fixtures are snapshotted twice per case)."""


def _digest(path: str, info: os.stat_result) -> str:
    key = (path, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    if key not in _digests:
        with open(path, "rb") as f:
            _digests[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _digests[key]


def snapshot(folders: Iterable[Path]) -> dict[str, tuple]:
    """Every entry under `folders`: a file's size, mtime and sha256, a link's target, or the kind of a
    special file (a FIFO is never opened). Links to folders are not followed."""
    seen: dict[str, tuple] = {}
    for folder in folders:
        for parent, dirs, files in os.walk(folder, followlinks=False):
            for name in dirs + files:
                path = os.path.join(parent, name)
                info = os.lstat(path)
                if stat.S_ISLNK(info.st_mode):
                    seen[path] = ("link", os.readlink(path))
                elif stat.S_ISREG(info.st_mode):
                    seen[path] = ("file", info.st_size, info.st_mtime_ns, _digest(path, info))
                else:
                    seen[path] = ("other", stat.S_IFMT(info.st_mode))
    return seen


def differences(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    changed = [f"changed {p}" for p in before if p in after and before[p] != after[p]]
    changed += [f"removed {p}" for p in before if p not in after]
    return changed + [f"created {p}" for p in after if p not in before]


# --- processes -----------------------------------------------------------------------------------


def poll_until(done: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """True once `done()` is; False if `timeout_s` passes first (a bounded wait, never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
    return True


def _describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid}: {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {process.pid}"


def _descendants() -> dict[int, psutil.Process]:
    found = {}
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if not any(helper in " ".join(process.cmdline()) for helper in _HELPERS):
                found[process.pid] = process
    return found


def _left_behind(before: dict[int, psutil.Process]) -> list[str]:
    """New descendants still alive after JOIN_S (our children are reaped while waiting); killed then,
    so one case's leftovers do not become the next case's."""
    new = [p for pid, p in _descendants().items() if pid not in before]
    _, alive = psutil.wait_procs(new, timeout=JOIN_S)
    described = [_describe(p) for p in alive]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    return described


def marked_processes(token: str) -> list[int]:
    """Pids of live processes whose environment carries MARKER=token (from /proc, so a process that
    was re-parented to init is found too)."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _kill_marked(token: str) -> None:
    for pid in marked_processes(token):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# --- in-process runs -----------------------------------------------------------------------------


def _process_state() -> dict[str, object]:
    dist = sys.modules.get("torch.distributed")
    return {
        "environment": dict(os.environ),
        "working directory": os.getcwd(),
        "signal handlers": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)},
        "process group": bool(dist is not None and dist.is_available() and dist.is_initialized()),
    }


def _restore(before: dict[str, object]) -> list[str]:
    """Put back what the command changed in this process, so the next case starts clean; return what it
    left changed that an embedding program would suffer from (the environment is the trainer's own
    business: it sets its determinism and flight-recorder variables)."""
    after = _process_state()
    changed = [key for key in before if key != "environment" and before[key] != after[key]]
    if before["environment"] != after["environment"]:  # the trainer's own settings; not a finding
        os.environ.clear()
        os.environ.update(before["environment"])
    os.chdir(before["working directory"])
    for number, handler in before["signal handlers"].items():
        signal.signal(number, handler)
    if after["process group"] and not before["process group"]:
        sys.modules["torch.distributed"].destroy_process_group()
    return changed


def _timeout(signum, frame) -> None:
    raise CaseTimeout


@contextlib.contextmanager
def _memory_budget(extra: int):
    """Lower this process's soft address-space limit to what it uses now plus `extra`, then restore it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = psutil.Process().memory_info().vms + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_in_process(
    argv: list[str], *, watched: list[Path], work: Path, timeout_s: float, launches: bool = True, **_
) -> Outcome:
    """``lockstep.cli.main(argv)`` here, with both streams captured (WARNING log records included, which a
    `lockstep` process prints on stderr) and a SIGALRM timeout for reads that block."""
    from lockstep.cli import main

    before_files, before_children, before_state = snapshot(watched), _descendants(), _process_state()
    scratch = work / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, str(scratch)
    out, err, records = io.StringIO(), io.StringIO(), WarningRecords()
    code, escaped, hung = None, "", False
    previous_alarm = signal.signal(signal.SIGALRM, _timeout)
    logging.getLogger().addHandler(records)
    started = time.perf_counter()
    try:
        stand_in = contextlib.nullcontext() if launches else mock.patch(_LAUNCHER, return_value=0)
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(record=True),
            stand_in,
            _memory_budget(MEMORY_BUDGET),
        ):
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: what a process would exit with
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except CaseTimeout:
                hung, escaped = True, traceback.format_exc()
            except KeyboardInterrupt:  # the person running the suite, not the case
                raise
            except BaseException:  # any other escape is the finding
                escaped = traceback.format_exc()
                code = 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        seconds = time.perf_counter() - started
        signal.signal(signal.SIGALRM, previous_alarm)
        logging.getLogger().removeHandler(records)
        tempfile.tempdir = saved_tempdir
    stderr = err.getvalue() + "".join(line + "\n" for line in records.lines)
    if escaped:
        stderr += escaped
    state = _restore(before_state)
    leftover = _left_behind(before_children)
    stray = [f"left {p} in the temporary folder" for p in scratch.iterdir()]
    changed = differences(before_files, snapshot(watched)) + stray
    return Outcome(
        argv=argv, code=code, stdout=out.getvalue(), stderr=stderr, seconds=seconds, escaped=escaped, hung=hung,
        changed=changed, leftover=leftover, state=state,
    )  # fmt: skip


# --- subprocess runs -----------------------------------------------------------------------------


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_subprocess(
    argv: list[str],
    *,
    watched: list[Path],
    work: Path,
    timeout_s: float,
    drive: Callable[[subprocess.Popen, Path], None] | None = None,
    **_,
) -> Outcome:
    """A real ``lockstep`` process (this checkout's library first on PYTHONPATH), its output to files so
    that a long run never blocks on a full pipe; afterwards every process carrying its marker must be
    gone within JOIN_S (those left are reported, then killed)."""
    before_files = snapshot(watched)
    token = uuid.uuid4().hex
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = os.environ | {MARKER: token, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    out_path, err_path = work / "stdout.txt", work / "stderr.txt"
    started = time.perf_counter()
    hung = False
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(
            [str(LOCKSTEP), *argv], stdout=out, stderr=err, env=env, cwd=work, preexec_fn=_limit_memory
        )
        try:
            if drive is not None:
                drive(process, work)
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            hung = True
            _kill_marked(token)
            process.wait(timeout=30)
    seconds = time.perf_counter() - started
    poll_until(lambda: not marked_processes(token), JOIN_S)
    leftover = [f"pid {pid}" for pid in marked_processes(token)]
    _kill_marked(token)
    changed = differences(before_files, snapshot(watched))
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    return Outcome(
        argv=argv, code=process.returncode, stdout=stdout, stderr=stderr, seconds=seconds, hung=hung, changed=changed,
        leftover=leftover,
    )  # fmt: skip


# --- the contract --------------------------------------------------------------------------------


def judge(expect: frozenset[int], outcome: Outcome) -> list[str]:
    """Every way `outcome` breaks the shared contract (empty: it keeps it)."""
    problems = []
    if outcome.hung:
        problems.append("still running at the case's timeout (a read that blocks, or unbounded work)")
    elif outcome.escaped:
        problems.append(f"an exception escaped main (the user gets a traceback): {_exception(outcome.escaped)[:300]}")
    if outcome.code not in expect:
        problems.append(f"exit {outcome.code}, documented: {sorted(expect)}")
    if "Traceback" in outcome.stderr + outcome.stdout and not outcome.escaped:
        problems.append("printed a Traceback")
    if outcome.code == 2:
        problems += _one_line(outcome.argv[0], outcome.stderr)
    problems += [f"touched a file it may only read: {c}" for c in outcome.changed[:5]]
    problems += [f"left a process behind: {p}" for p in outcome.leftover]
    problems += [f"changed this process's {s}" for s in outcome.state]
    return problems


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Timeout)\b")


def _exception(text: str) -> str:
    """The ``SomeError: message`` line of a traceback (a C++ error's message runs over many lines)."""
    lines = text.strip().splitlines()
    return next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), lines[-1])


def _one_line(command: str, stderr: str) -> list[str]:
    lines = stderr.splitlines()
    if len(lines) != 1:
        shown = " | ".join(line[:120] for line in lines[:3])
        return [f"a refusal must be one stderr line; got {len(lines)}: {shown}"]
    if not re.match(rf"lockstep {re.escape(command)}( [a-z-]+)?: error: \S", lines[0]):
        return [f"the line does not start 'lockstep {command}: error: ': {lines[0][:200]}"]
    if len(lines[0]) > MAX_LINE:
        return [f"the error line has {len(lines[0])} characters (a dump, not a message)"]
    return []


def run_case(case: Case, fixtures: Fixtures, work: Path) -> Verdict:
    """Build the case's inputs in `work` (its own folder), run it and judge it."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        argv = [os.fsdecode(arg) if isinstance(arg, bytes) else str(arg) for arg in case.build(work, fixtures)]
    except Exception:  # a broken case is the suite's bug: reported like a failure, not ending a benchmark run
        built = Outcome(argv=[case.id], code=None, stdout="", stderr="", seconds=0.0, escaped=traceback.format_exc())
        return Verdict(case, built, ["the case's inputs could not be built (a bug of the suite)"])
    runner = run_subprocess if case.subprocess else run_in_process
    outcome = runner(
        argv, watched=[fixtures.root], work=work, timeout_s=case.timeout_s, drive=case.drive, launches=case.launches
    )
    problems = judge(case.expect, outcome) + (case.check(work, outcome) if case.check else [])
    return Verdict(case, outcome, problems)
