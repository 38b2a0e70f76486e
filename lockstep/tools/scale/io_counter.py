"""Count one process's file-system work: opens, stats, directory listings, memory maps, fsyncs and bytes.

A rank of a 512-rank job must touch only its own share of the data and checkpoint files; on 2 ranks of
one box that cannot be timed, so it is counted. Python's audit hooks report every ``open`` (builtins,
``os.open``, numpy's memmap), ``os.listdir``/``os.scandir`` and ``mmap``; ``os.stat``/``os.lstat`` and
``os.fsync`` have no audit event and are wrapped while a count runs (``pathlib`` and ``os.path`` look
them up at each call). Bytes read and written come from the kernel's own per-process counters
(``/proc/self/io``: ``rchar``/``wchar``, every read and write system call of every thread, DCP's
writer threads included); pages read through a memory map are not system calls and are not in them.

Audit hooks cannot be removed, so one hook is installed once and feeds the innermost count running:
a count inside another (a checkpoint save inside a training step) takes its work, bytes included, out
of the outer one, and ``not_counted`` does the same for work done on another rank's behalf.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

_ACTIVE: list[FileOps] = []
_REAL = {"stat": os.stat, "lstat": os.lstat, "fsync": os.fsync}
_HOOKED = False


@dataclass
class FileOps:
    """What one phase did to the file system; paths are kept per kind so a test can say which files."""

    opens: Counter[str] = field(default_factory=Counter)
    """Opened paths (reads and writes alike), with how often each was opened."""
    written: set[str] = field(default_factory=set)
    """Paths opened for writing."""
    stats: int = 0
    listings: int = 0
    maps: int = 0
    fsyncs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    _nested_bytes: list[int] = field(default_factory=lambda: [0, 0], repr=False)
    """Bytes read and written inside counts nested in this one: theirs, not this count's."""

    def opened_under(self, folder: Path | str) -> set[str]:
        """The distinct paths opened inside `folder`."""
        prefix = str(Path(folder).resolve()) + os.sep
        return {path for path in self.opens if path.startswith(prefix)}

    def as_record(self) -> dict[str, int]:
        return {
            "opens": sum(self.opens.values()),
            "files": len(self.opens),
            "written": len(self.written),
            "stats": self.stats,
            "listings": self.listings,
            "maps": self.maps,
            "fsyncs": self.fsyncs,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
        }


def _writes(mode: object, flags: object) -> bool:
    if isinstance(mode, str) and mode:
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))


_CODE_SUFFIXES = (".py", ".pyc", ".so", ".pth", ".typed")


def _python_internals(name: str, directory: bool = False) -> bool:
    """A module, package metadata, or a directory the import system lists (a sys.path entry or a
    package), read by a lazy import inside the counted code: the interpreter's work, not the rank's."""
    if name.endswith(_CODE_SUFFIXES) or f"{os.sep}__pycache__" in name or name in ("/proc/self/io", os.devnull):
        return True  # /proc/self/io: the counter's own reads; os.devnull: a module probing file types
    if any(f"{suffix}{os.sep}" in name for suffix in (".egg-info", ".dist-info")):
        return True  # package metadata (importlib.metadata's version lookups)
    if any(name == root or name.startswith(root + os.sep) for root in (sys.prefix, sys.base_prefix)):
        return True
    return directory and (name in sys.path or _is_file(os.path.join(name, "__init__.py")))


def _is_file(path: str) -> bool:
    """os.path.isfile through the unwrapped stat (the counter must not count its own checks)."""
    try:
        return stat.S_ISREG(_REAL["stat"](path).st_mode)
    except OSError:
        return False


def _hook(event: str, args: tuple) -> None:
    if not _ACTIVE:
        return
    ops = _ACTIVE[-1]
    if event == "open":
        path = args[0]
        if isinstance(path, int) or path is None:
            return  # an already open descriptor (os.fdopen): counted when it was opened
        name = os.path.abspath(os.fsdecode(path))
        if _python_internals(name):
            return
        ops.opens[name] += 1
        if _writes(args[1] if len(args) > 1 else None, args[2] if len(args) > 2 else None):
            ops.written.add(name)
    elif event in ("os.listdir", "os.scandir"):
        path = args[0] if args and args[0] is not None else "."
        if isinstance(path, int) or not _python_internals(os.path.abspath(os.fsdecode(path)), directory=True):
            ops.listings += 1
    elif event == "mmap.__new__":
        ops.maps += 1


def _io_counters() -> tuple[int, int]:
    """(rchar, wchar) of this process; zeros without /proc."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except OSError:
        return 0, 0
    return int(fields["rchar"]), int(fields["wchar"])


def _counting(original: Callable, attribute: str) -> Callable:
    def counted(path, *args, **kwargs):
        if _ACTIVE and (isinstance(path, int) or not _python_internals(os.path.abspath(os.fsdecode(path)))):
            setattr(_ACTIVE[-1], attribute, getattr(_ACTIVE[-1], attribute) + 1)
        return original(path, *args, **kwargs)

    return counted


@contextlib.contextmanager
def counting_file_ops() -> Iterator[FileOps]:
    """Count the file-system work done inside the block (this process, every thread)."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_hook)
        _HOOKED = True
    ops = FileOps()
    if not _ACTIVE:  # the first count running wraps them; counts nested in it share the wrappers
        os.stat, os.lstat = _counting(_REAL["stat"], "stats"), _counting(_REAL["lstat"], "stats")
        os.fsync = _counting(_REAL["fsync"], "fsyncs")
    read, written = _io_counters()
    _ACTIVE.append(ops)
    try:
        yield ops
    finally:
        _ACTIVE.remove(ops)
        if not _ACTIVE:
            os.stat, os.lstat, os.fsync = _REAL["stat"], _REAL["lstat"], _REAL["fsync"]
        now_read, now_written = _io_counters()
        ops.bytes_read = now_read - read - ops._nested_bytes[0]
        ops.bytes_written = now_written - written - ops._nested_bytes[1]
        for outer in _ACTIVE:
            outer._nested_bytes[0] += now_read - read - ops._nested_bytes[0]
            outer._nested_bytes[1] += now_written - written - ops._nested_bytes[1]


@contextlib.contextmanager
def not_counted() -> Iterator[None]:
    """Work inside the block belongs to no count running: a harness playing rank r of a job does rank
    0's share too (publishing a checkpoint) so that what follows finds it, and rank r's figures must
    not include it."""
    if not _ACTIVE:
        yield
        return
    with counting_file_ops():
        yield
