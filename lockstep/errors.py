"""Errors a user can fix: each says in one line what is wrong, where, and how to fix it.

The CLI prints them as one line and exits 2 (no traceback; ``LOCKSTEP_TRACEBACK=1`` shows it).
Anything else that escapes is a failure of lockstep or of the machine: exit 1 with the traceback.
"""

from __future__ import annotations

from pathlib import Path


class LockstepError(ValueError):
    """A user-fixable problem (bad config, bad input file, unusable checkpoint); exit code 2."""


class InputError(LockstepError):
    """A bad input file: names the file (and line or record where known), the problem and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str = "", *, where: str = "") -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        location = f"{self.path}:{where}" if where else self.path
        super().__init__(f"{location}: {problem}" + (f"; {fix}" if fix else ""))
