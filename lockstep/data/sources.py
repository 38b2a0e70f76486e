"""Where documents come from: the built-in corpus, or a user's text, json/jsonl or parquet files.

Each source yields documents (strings) in a fixed order and has a fingerprint (content sha256) so
a tokenized cache, and later a resumed run, can tell whether the data changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lockstep.config.errors import ConfigError

_EXTENSIONS = {"text": (".txt",), "json": (".json", ".jsonl"), "parquet": (".parquet",)}


@dataclass(frozen=True)
class DocumentSource:
    kind: str
    """text, json, parquet, or builtin (the built-in corpus's own jsonl, read without `datasets`)."""
    files: tuple[Path, ...]
    text_field: str = "text"

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.kind}/{self.text_field}".encode())
        for file in self.files:
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
        return digest.hexdigest()

    def documents(self) -> Iterator[str]:
        """Documents in file order; json and parquet stream through Hugging Face `datasets`."""
        if self.kind == "text":  # one file, one document
            for file in self.files:
                yield file.read_text(encoding="utf-8")
            return
        if self.kind == "builtin":
            for file in self.files:
                with open(file, encoding="utf-8") as f:
                    yield from (json.loads(line)[self.text_field] for line in f)
            return
        from datasets import load_dataset

        builder = "json" if self.kind == "json" else "parquet"
        stream = load_dataset(builder, data_files=[str(f) for f in self.files], split="train", streaming=True)
        for record in stream:
            if self.text_field not in record:
                raise ConfigError(
                    "data.text_field", f"record has no field {self.text_field!r}; fields: {sorted(record)}"
                )
            yield record[self.text_field]


def file_source(kind: str, path: str, text_field: str) -> DocumentSource:
    """A file, or every matching file in a folder (sorted), of the given dataset kind."""
    root = Path(path)
    if root.is_dir():
        files = tuple(sorted(p for p in root.rglob("*") if p.suffix in _EXTENSIONS[kind]))
    elif root.is_file():
        files = (root,)
    else:
        raise ConfigError("training.dataset_path", f"no such file or folder: {path}")
    if not files:
        raise ConfigError("training.dataset_path", f"no {'/'.join(_EXTENSIONS[kind])} files under {path}")
    return DocumentSource(kind, files, text_field)
