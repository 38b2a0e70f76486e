"""Child processes die with their parent, whatever kills the parent.

A worker of ``lockstep train --nproc`` or of ``lockstep data prepare`` that outlives its launcher (the
launcher SIGKILLed, its terminal gone) would go on training and checkpointing under PID 1, or writing
a half-finished dataset. Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) has the kernel send
the child a signal when its parent exits, by any means. SIGTERM is asked for, so a trainer stops the way
it does on any SIGTERM (the ranks agree, save and leave) rather than mid-write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` to this process when its parent exits; if the parent is already
    gone (it died before this ran: the process was re-parented), send it now. False where the platform
    has no parent-death signal (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), signum)
    return True
