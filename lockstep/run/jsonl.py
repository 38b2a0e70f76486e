"""The one writer of the JSON Lines files a run writes: metrics.jsonl, fingerprints/rank<R>.jsonl,
spikes.jsonl (with the spiking step's per-sample losses), faults.jsonl, the CPU memory timeline and
metrics.rewound.jsonl.

One record is one line, appended whole and flushed at once, so a crash leaves at most a torn last line
(readers skip it, or move it aside on resume). fsync policy: a record is flushed to the kernel when it
is appended, never fsynced unless the writer asks for it (``fsync=True``): a crashed process loses
nothing, a crashed machine at most its last records, which the run recomputes from its last checkpoint.

Floats are written with Python's repr, which round-trips, so values can be compared bitwise from the
files. A strict writer (``strict=True``: metrics, spikes) writes NaN and infinities as the strings
"NaN", "Infinity" and "-Infinity", which any JSON reader accepts; ``json_floats`` turns them back.

Rotation: a fresh run keeps an earlier run's file under a numbered name (``keep_numbered``); a run
resumed at step k moves the records past k, about to be recomputed, to another file (``rewind``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any

from lockstep.untrusted import parse_json

NONFINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by its NONFINITE_STRINGS name (nested too), since
    bare NaN/Infinity tokens are not JSON and break strict readers (jq, JavaScript, pandas' ujson)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def json_floats(value: Any) -> Any:
    """The inverse of strict_json: the names back to float NaN and infinities (nested too)."""
    if isinstance(value, str):
        return NONFINITE_STRINGS.get(value, value)
    if isinstance(value, dict):
        return {k: json_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_floats(v) for v in value]
    return value


class JsonlWriter:
    """Appends records to one JSON Lines file. ``keep_open`` holds the file between records (a file
    written every logged step); otherwise each record opens and closes it (occasional records, and
    several writers of one folder)."""

    def __init__(
        self,
        path: Path,
        *,
        strict: bool = False,
        keep_open: bool = False,
        fsync: bool = False,
        make_folder: bool = False,
    ) -> None:
        self.path = Path(path)
        self.strict = strict
        self.fsync = fsync
        self.make_folder = make_folder
        self._file: IO[str] | None = self._open() if keep_open else None

    def _open(self) -> IO[str]:
        if self.make_folder:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        return open(self.path, "a")

    def line(self, record: dict[str, Any]) -> str:
        """The line `record` is written as, its newline included."""
        if self.strict:
            return json.dumps(strict_json(record), allow_nan=False) + "\n"
        return json.dumps(record) + "\n"

    def append(self, record: dict[str, Any]) -> None:
        self.append_text(self.line(record))

    def append_text(self, text: str) -> None:
        """Lines already written once (a rewind's), appended as they are."""
        if self._file is not None:
            self._write(self._file, text)
            return
        with self._open() as out:
            self._write(out, text)

    def _write(self, out: IO[str], text: str) -> None:
        out.write(text)
        out.flush()
        if self.fsync:
            os.fsync(out.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def keep_numbered(path: Path) -> Path:
    """Move an earlier run's `path` (NAME.jsonl) aside as NAME.N.jsonl, N the first number free."""
    n = 1
    while path.with_suffix(f".{n}{path.suffix}").exists():
        n += 1
    numbered = path.with_suffix(f".{n}{path.suffix}")
    os.replace(path, numbered)
    return numbered


def record_step(line: str) -> float:
    """The step of a record; +inf for a line that is not one (a write torn by a crash or a full disk),
    which then moves aside with the records to recompute instead of stopping the resume."""
    try:
        return int(parse_json(line, allow_nan=True)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def rewind(path: Path, step: int, aside: Path) -> None:
    """Move the records of `path` past `step` (steps about to be recomputed; torn lines too) to the
    end of `aside`, keeping the others in place."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    kept = [line for line in lines if record_step(line) <= step]
    rewound = [line for line in lines if record_step(line) > step]
    if rewound:
        JsonlWriter(aside).append_text("\n".join(rewound) + "\n")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
