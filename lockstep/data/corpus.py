"""The built-in corpus: documentation text that every Python install carries, assembled locally.

One document per standard-library source file (its module, class and function docstrings, read
with ``ast`` so nothing is imported or executed) plus one per pydoc help topic. The order is
fixed (sorted paths, then sorted topics), so the corpus and its sha256 depend only on the Python
version. About 2 MB of English technical prose: enough for a debug model's loss to fall visibly.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from lockstep.data.cache import atomic_path, cache_root

_SKIPPED_DIRS = {
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "__pycache__",
    "lib2to3",
    "turtledemo",
    "ensurepip",
}
VALIDATION_EVERY = 50
"""Documents whose content hash is divisible by this go to the validation split (2%)."""


@dataclass(frozen=True)
class BuiltinCorpus:
    train_path: Path
    validation_path: Path
    sha256: str


def _stdlib_sources() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        files.extend(Path(root) / n for n in sorted(names) if n.endswith(".py"))
    return files


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = (
        n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    )
    return "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))


def corpus_documents() -> list[str]:
    """Every document of the corpus, in its fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in _stdlib_sources():
        text = _docstrings(path)
        if text:
            documents.append(f"{path.relative_to(stdlib).as_posix()}\n\n{text}")
    from pydoc_data.topics import topics

    documents.extend(f"{name}\n\n{topics[name]}" for name in sorted(topics))
    return documents


def _is_validation(document: str) -> bool:
    return int(hashlib.sha256(document.encode()).hexdigest(), 16) % VALIDATION_EVERY == 0


def builtin_corpus(cache_folder: str = "") -> BuiltinCorpus:
    """The corpus as train/validation jsonl files (built once, cached by Python version)."""
    folder = cache_root(cache_folder) / f"builtin-corpus-py{sys.version_info.major}.{sys.version_info.minor}"
    sha_file = folder / "sha256"
    if not sha_file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        documents = corpus_documents()
        digest = hashlib.sha256()
        for split, keep in (("train", False), ("validation", True)):
            with atomic_path(folder / f"{split}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
                for document in documents:
                    if _is_validation(document) == keep:
                        f.write(json.dumps({"text": document}) + "\n")
        for document in documents:
            digest.update(document.encode())
            digest.update(b"\0")
        with atomic_path(sha_file) as tmp:
            tmp.write_text(digest.hexdigest())
    return BuiltinCorpus(folder / "train.jsonl", folder / "validation.jsonl", sha_file.read_text().strip())
