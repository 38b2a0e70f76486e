"""Start this machine's processes of a command through torchrun (``lockstep train --nproc N``,
``lockstep convert from-hf --nproc N``).

torchrun's launcher (``torch.distributed.run``, its own argument parser and agent) runs inside this
process rather than as a child, for two reasons:

- Stopping. SIGINT/SIGTERM sent to ``lockstep`` are forwarded once to every worker (a terminal's
  Ctrl-C reaches only this process: torchrun puts each worker in a session of its own). Each worker
  then stops after the same step (the trainer agrees on the stop flag every step), saves its stop
  checkpoint and exits 75, which is this command's exit code too. torchrun's own handler for these
  two signals is left out (``--signals-to-handle``): it raises inside the agent, which then loses the
  workers' exit codes, and a second signal during its shutdown wait leaves the workers unsupervised.
  Here a second Ctrl-C reaches the workers as their second SIGINT, which interrupts them at once.
- Errors. A worker's bad input (exit 2) comes back as the one line it wrote to torchrun's error file
  (TORCHELASTIC_ERROR_FILE), printed once, instead of torchrun's ChildFailedError report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path

from lockstep.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, EXIT_STOPPED, EXIT_STOPPED_UNSAVED
from lockstep.config import ConfigError
from lockstep.errors import LockstepError
from lockstep.wall_clock import for_workers

LAUNCHED_ENV = "LOCKSTEP_LAUNCHED"
"""Set for the workers of ``lockstep COMMAND --nproc``: a bad-input error goes to torchrun's error file
only, and the launcher prints it once (plain torchrun workers also print theirs)."""
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
AGENT_SIGNALS = "SIGQUIT"
"""torchrun's default --signals-to-handle less SIGINT, SIGTERM and SIGHUP, which are forwarded here (a
worker stops on SIGHUP as on SIGTERM: the ranks agree, save and exit 75)."""


def _without_nproc(argv: list[str]) -> list[str]:
    forwarded, skip = [], False
    for arg in argv:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            forwarded.append(arg)
    return forwarded


def check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise ConfigError("--nproc", f"must be >= 1; got {nproc}")


def record_worker_error(error: LockstepError) -> bool:
    """Under torchrun, write a worker's one-line error to its error file (torchrun reports it as the
    failure's message). Returns True when the ``lockstep`` launcher will print it, so the worker
    should stay quiet (N ranks would otherwise print N copies)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return False
    # torchrun's plain-string error record: {"message": str, "timestamp": seconds}.
    Path(error_file).write_text(json.dumps({"message": str(error), "timestamp": int(time.time())}))
    return os.environ.get(LAUNCHED_ENV) == "1"


def _children() -> list[int] | None:
    """Pids of this process's children, which are torchrun's workers (the agent runs here and spawns
    nothing else); None without a /proc file system."""
    if not os.path.isdir("/proc"):
        return None
    me, pids = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            pids.append(int(entry.name))
    return pids


class _SignalForwarder:
    """Forwards SIGINT/SIGTERM to the workers and remembers them; before any worker exists it hands
    the signal to torchrun's agent (SignalException), which stops the launch."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, frame) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        self.received.append(signum)
        workers = _children()
        if not workers:
            raise SignalException(f"lockstep got {signal.Signals(signum).name} before the workers started", signum)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in FORWARDED_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class _OutcomeReportedHere(logging.Filter):
    """Drops torchrun's per-failure log lines (the failed rank, the SIGTERM to the others): the
    launcher reports the outcome itself, in one line. Its warnings about hung workers stay."""

    REPORTED = ("failed (exitcode", "Sending process %s closing signal")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.REPORTED)


@contextlib.contextmanager
def _quiet_outcome_logs():
    logger, log_filter = logging.getLogger("torch.distributed.elastic.multiprocessing.api"), _OutcomeReportedHere()
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """os.environ with these values for the launch (torchrun copies it into every worker)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _exit_code(failed, received: list[int], command: str) -> int:
    """The command's exit code for torchrun's ChildFailedError (failures by global rank)."""
    codes = [f.exitcode for f in failed.failures.values()]
    # Stopped: a rank exited 75 (stop saved; the ranks leave together after a barrier) or a signal was
    # forwarded (one that lands before a worker's handler is set kills it: nothing was trained yet), and
    # every rank did so or died of that signal or of torchrun's SIGTERM/SIGKILL to the ranks still
    # running once one has exited.
    after_stop = {EXIT_STOPPED, EXIT_STOPPED_UNSAVED, -signal.SIGTERM, -signal.SIGKILL, *(-s for s in received)}
    stopped = {EXIT_STOPPED, EXIT_STOPPED_UNSAVED} & set(codes)
    if (stopped or received) and all(code in after_stop for code in codes):
        return EXIT_STOPPED if stopped == {EXIT_STOPPED} else EXIT_STOPPED_UNSAVED
    rank, first = _cause(failed)
    message = first.error_file_data.get("message")
    if first.exitcode == EXIT_BAD_INPUT and isinstance(message, str):
        raise LockstepError(f"rank {rank}: {message}")
    how = f"signal {first.signal_name()}" if first.exitcode < 0 else f"exit code {first.exitcode}"
    print(f"lockstep {command}: rank {rank} failed ({how}); its output above says why", flush=True)
    return first.exitcode if first.exitcode > 0 else EXIT_FAILURE


def _cause(failed) -> tuple[int, object]:
    """The failure that most likely caused the others. A rank killed from outside (kill -9, the OOM
    killer) makes its peers' collectives fail at once and exit 1 (PeerLost), sometimes before torchrun
    notices the killed one: when the first failure is such an exit 1, a rank that died of a signal is
    named instead."""
    rank, first = failed.get_first_failure()
    if first.exitcode != EXIT_FAILURE:
        return rank, first
    killed = [(r, f) for r, f in sorted(failed.failures.items()) if f.exitcode < 0]
    return killed[0] if killed else (rank, first)


def launch_torchrun(nproc: int, argv: list[str], command: str = "train") -> int:
    """Run ``lockstep COMMAND argv`` (less --nproc) under torchrun --standalone with N processes (one
    machine), one share of the CPU threads each unless OMP_NUM_THREADS is set. Returns the exit code:
    0, 75 when stopped by SIGINT/SIGTERM, else the first failed rank's (a bad input raises its one
    line instead)."""
    check_nproc(nproc)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    forward = _children() is not None
    torchrun_args = ["--standalone", f"--nproc-per-node={nproc}"]
    if forward:
        torchrun_args.append(f"--signals-to-handle={AGENT_SIGNALS}")
    entry = ["-m", "lockstep.train"] if command == "train" else ["-m", "lockstep.cli.worker", command]
    args = torchrun.get_args_parser().parse_args([*torchrun_args, *entry, *_without_nproc(argv)])
    forwarder = _SignalForwarder()
    environment = {"OMP_NUM_THREADS": threads, LAUNCHED_ENV: "1", **for_workers()}  # wall_s counts from here
    with _environment(environment), _quiet_outcome_logs():
        with forwarder.installed() if forward else contextlib.nullcontext():
            try:
                torchrun.run(args)
            except ChildFailedError as failed:
                return _exit_code(failed, forwarder.received, command)
            except SignalException:  # torchrun's agent stopped the workers (SIGTERM, then SIGKILL)
                return EXIT_STOPPED
    return EXIT_OK
