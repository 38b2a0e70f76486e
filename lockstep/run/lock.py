"""One run per run folder: rank 0 holds an OS lock on ``<dump_folder>/.lock`` for the life of the run.

Two runs writing one folder would resume from each other's checkpoints, prune each other's in-flight
``.partial`` saves and interleave two histories in metrics.jsonl, so a second run is refused before it
does any work, naming the holder. The lock is ``fcntl.flock``: the kernel drops it when its holder
exits, however it exits, so a lock left by a killed run is simply taken over (with a note, since the
file still names the holder that never released it). The file itself is kept (unlinking a flock file
races with a process that is about to lock it); a clean release only empties it.

Within one process a second Trainer on the same folder takes the lock over from the first: the OS
lock guards against other processes, and tests and notebooks build several Trainers in one process
without always closing the earlier ones.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lockstep.errors import InputError, LockstepError
from lockstep.run.folder import plain_or_absent
from lockstep.untrusted import parse_json

LOCK_FILE = ".lock"

_HELD: dict[str, RunLock] = {}
"""This process's locks by resolved run folder, so a later Trainer in the process can take one over."""


class RunFolderBusy(LockstepError):
    """Another live run holds the run folder."""


def _usable_folder(folder: Path) -> Path:
    """The run folder, created if missing; InputError (naming it and the fix) if it cannot be used."""
    fix_path = "pass --job.dump_folder a folder this user can write"
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "job.dump_folder is a file, not a folder", f"move the file away or {fix_path}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(folder, f"cannot create the run folder (job.dump_folder): {e.strerror}", fix_path) from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(folder, "the run folder (job.dump_folder) is not writable", fix_path)
    return folder


def _open_lock_file(folder: Path) -> int:
    path = folder / LOCK_FILE
    plain_or_absent(path)  # the holder written through a link would change a file outside the run
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise InputError(path, f"cannot open the run folder lock: {e.strerror}", "check its permissions") from e


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder recorded in the lock file; None when empty (released cleanly) or unreadable."""
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = parse_json(text)
    except ValueError:
        return {"unreadable": text[:80]}
    return holder if isinstance(holder, dict) else {"unreadable": text[:80]}


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that has not yet recorded itself"
    if "unreadable" in holder:
        return f"an unknown process (lock file holds {holder['unreadable']!r})"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started_at')})"


def _try_lock(fd: int, folder: Path) -> bool:
    """Take the exclusive lock without waiting; False when another open file description holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        os.close(fd)
        raise InputError(
            folder / LOCK_FILE,
            f"the file system refuses a lock ({e.strerror})",
            "put job.dump_folder on a file system with flock support",
        ) from e
    return True


def _busy(folder: Path, fd: int) -> RunFolderBusy:
    holder = describe_holder(_read_holder(fd))
    os.close(fd)
    return RunFolderBusy(
        f"{folder}: the run folder is in use by another run, {holder}; wait for it to finish or stop it, "
        "or pass another --job.dump_folder"
    )


def check_run_folder_free(folder: Path) -> None:
    """Refuse (RunFolderBusy, InputError) a folder that cannot be used or that a live run holds,
    without taking it: lets a launcher fail in one line before it starts N processes."""
    key = str(_usable_folder(folder).resolve())
    if key in _HELD:
        return
    fd = _open_lock_file(folder)
    if not _try_lock(fd, folder):
        raise _busy(folder, fd)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class RunLock:
    """The exclusive lock of one run folder, held from `acquire` until `release` (or process exit)."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = folder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path, log: Callable[[str], None] = print) -> RunLock:
        """Lock `folder` (created if missing) for this run and record the holder in its lock file;
        refuses a folder another live run holds, and one that is a file or not writable."""
        folder = _usable_folder(folder)
        key = str(folder.resolve())
        earlier = _HELD.get(key)
        if earlier is not None and earlier._fd is not None:  # an earlier Trainer of this process
            lock, earlier._fd = cls(folder, earlier._fd), None
            _HELD[key] = lock
            return lock
        fd = _open_lock_file(folder)
        if not _try_lock(fd, folder):
            raise _busy(folder, fd)
        previous = _read_holder(fd)
        if previous:
            log(
                f"note: taking over the lock of run folder {folder}: its last holder, {describe_holder(previous)}, "
                "ended without releasing it (killed or crashed)"
            )
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        lock = cls(folder, fd)
        _HELD[key] = lock
        return lock

    def release(self) -> None:
        """Empty the lock file (a clean end: the next run has nothing to take over) and unlock.
        Idempotent; a lock handed over to a later Trainer of this process is left to that one."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.pop(str(self.folder.resolve()), None)
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
