"""Where built artefacts (the built-in corpus, its tokenizer, tokenized datasets) are cached."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_folder: str = "") -> Path:
    """data.cache_folder, else $LOCKSTEP_CACHE, else ~/.cache/lockstep."""
    root = cache_folder or os.environ.get("LOCKSTEP_CACHE") or Path.home() / ".cache" / "lockstep"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def publish(tmp_path: Path, final_path: Path) -> None:
    """Atomic rename, so a reader never sees a half-written cache entry (several ranks may race)."""
    os.replace(tmp_path, final_path)
