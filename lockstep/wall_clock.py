"""Seconds since the command started: ``wall_s`` in every metrics record.

``elapsed_s`` (lockstep.train.state) is training time: it starts at the first step of a launch, carries on
from the earlier launches' count on resume, and includes the evaluations and saves between steps. What
a user waits for starts earlier: the interpreter, the imports, tokenizing into the cache, building and
sharding the model, loading a checkpoint, the first step's compilation. ``wall_s`` counts all of it,
for this launch only.

The anchor is the kernel's record of when the process started (Linux: the start time in
``/proc/self/stat``, clock ticks since boot, read against CLOCK_BOOTTIME), not a time taken in Python,
which would miss the interpreter's start and the imports before it. A worker of ``lockstep train
--nproc`` counts from its launcher's start instead (passed in ``STARTED_ENV`` with the launcher's pid,
and taken only by that launcher's own children), so rank 0's records count from the command the user
typed, torchrun's start included. Without /proc (not Linux) the anchor is this module's first import.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

STARTED_ENV = "LOCKSTEP_STARTED"
"""PID:SECONDS, set by the launcher for its workers: its own start on this machine's clock (below)."""
_LINUX = sys.platform.startswith("linux")


def _now() -> float:
    """Seconds on the clock the kernel dates processes by (boot time, suspend included), else monotonic."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if _LINUX else time.monotonic()


_IMPORTED = _now()


def _own_start() -> float:
    if _LINUX:
        try:
            fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold ")"
            return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime (truncated to a tick)
        except (OSError, ValueError, IndexError):
            pass
    return _IMPORTED


@functools.cache
def started() -> float:
    """When the command started, on ``_now``'s clock: the launcher's start for its workers, else this process's."""
    parent, _, seconds = os.environ.get(STARTED_ENV, "").partition(":")
    if parent == str(os.getppid()):
        try:
            return float(seconds)
        except ValueError:
            pass
    return _own_start()


def wall_s() -> float:
    """Seconds since the command started (see ``started``)."""
    return _now() - started()


def for_workers() -> dict[str, str]:
    """The environment a launcher gives its workers so that they count from its start."""
    return {STARTED_ENV: f"{os.getpid()}:{started()!r}"}
