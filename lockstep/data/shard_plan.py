"""Cut a dataset's input into shards that workers can tokenize independently.

A shard is a whole file, or a byte range of a JSON Lines file cut just after a newline (so a record is
never split), or a row range of a Hugging Face dataset. The cuts depend only on the input files and the
target shard size, never on the number of workers or jobs: any split of the work writes the same shards.
Text files are one document each and .json arrays one parse each, so they are never cut.

The inputs are identified by their names, sizes and modification times (one ``stat`` each): cheap
enough for every start, and what decides whether a preparation is a no-op. Content is hashed once,
by the worker that reads it (lockstep.data.shard_writer).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lockstep.data.sources import DocumentSource
from lockstep.errors import InputError

SHARD_BYTES = 16 << 20
"""Target input bytes per shard: a few seconds of one tokenizer thread; 64 shards per GB keep every core busy
to the end (the last round of shards leaves some idle), and a TB makes a manifest of about 15 MB."""


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: documents of `path` from `start` to `end` (bytes, or rows for kind hf)."""

    name: str
    kind: str
    """text, parquet, json (a whole .json file), jsonl (a byte range of lines) or hf (a row range)."""
    path: str
    file_index: int
    """The file's index in the source record (what the plan stores instead of the path)."""
    start: int
    end: int
    text_field: str
    split: str = ""
    estimated_bytes: int = -1
    """Input bytes of a row range (kind hf: its share of the dataset's Arrow size), for progress and rates."""

    @property
    def input_bytes(self) -> int:
        return self.estimated_bytes if self.estimated_bytes >= 0 else self.end - self.start

    def record(self) -> dict:
        """The shard as plan.json stores it."""
        return {"name": self.name, "kind": self.kind, "file": self.file_index, "start": self.start, "end": self.end}


def reader_kind(source_kind: str, file: Path) -> str:
    """How a file of a source is read (the rules of DocumentSource.documents)."""
    if source_kind in ("text", "parquet"):
        return source_kind
    return "json" if file.suffix == ".json" else "jsonl"


def _stat(file: Path) -> os.stat_result:
    try:
        return file.stat()
    except OSError as e:
        raise InputError(file, f"cannot read it ({e.strerror})", "check its permissions") from e


def _line_cuts(file: Path, size: int, shard_bytes: int) -> list[int]:
    """Boundaries [0, ..., size] near multiples of shard_bytes, each just after a newline."""
    cuts = [0]
    with open(file, "rb") as f:
        target = shard_bytes
        while target < size:
            f.seek(target)
            f.readline()
            boundary = f.tell()
            if boundary >= size:
                break
            cuts.append(boundary)
            target = boundary + shard_bytes
    cuts.append(size)
    return cuts


def _relative_name(file: Path, root: Path) -> str:
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return file.name


def plan_files(source: DocumentSource, shard_bytes: int = SHARD_BYTES) -> tuple[dict, list[ShardTask]]:
    """The source record (identity of the inputs) and the shard tasks of a file source."""
    root = Path(source.location)
    root = root if root.is_dir() else root.parent
    files, tasks = [], []
    for file in source.files:
        status = _stat(file)
        files.append({"name": _relative_name(file, root), "size": status.st_size, "mtime_ns": status.st_mtime_ns})
        kind = reader_kind(source.kind, file)
        cuts = _line_cuts(file, status.st_size, shard_bytes) if kind == "jsonl" else [0, status.st_size]
        for start, end in zip(cuts, cuts[1:], strict=False):
            tasks.append(ShardTask(f"{len(tasks):05d}", kind, str(file), len(files) - 1, start, end, source.text_field))
    record = {"kind": source.kind, "text_field": source.text_field, "split": "", "files": files}
    return record, tasks


def plan_hf(name: str, split: str, text_field: str, shard_bytes: int = SHARD_BYTES) -> tuple[dict, list[ShardTask]]:
    """Row ranges of a Hugging Face dataset (a name in the local cache, or a folder), read offline."""
    dataset = load_hf_dataset(name, split, text_field)
    rows = len(dataset)
    nbytes = int(dataset.data.nbytes)
    num_shards = max(1, -(-nbytes // shard_bytes))
    bounds = [rows * i // num_shards for i in range(num_shards + 1)]
    tasks = [
        ShardTask(f"{i:05d}", "hf", name, 0, start, end, text_field, split, nbytes * (end - start) // max(rows, 1))
        for i, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False))
    ]
    files = [{"name": name, "rows": rows, "fingerprint": dataset._fingerprint}]
    return {"kind": "hf", "text_field": text_field, "split": split, "files": files}, tasks


def load_hf_dataset(name: str, split: str, text_field: str):
    """`datasets.load_dataset(name, split=split)` with no network (HF_DATASETS_OFFLINE unless set)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError, ...)
        raise InputError(
            name,
            f"datasets.load_dataset cannot load it offline ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            "pass a local dataset folder, or a dataset already in the Hugging Face cache, and an existing --split",
        ) from e
    if text_field not in dataset.column_names:
        raise InputError(
            name,
            f"has no column {text_field!r}; its columns: {', '.join(dataset.column_names)}",
            "pass --text-field with the column that holds the text",
        )
    return dataset


def identity(record: dict) -> str:
    """sha256 of the inputs' names, sizes and modification times (or a dataset's own fingerprint)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
