"""Where built artefacts (the built-in corpus, its tokenizer, tokenized datasets) are cached."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def cache_root(cache_folder: str = "") -> Path:
    """data.cache_folder, else $LOCKSTEP_CACHE, else ~/.cache/lockstep."""
    root = cache_folder or os.environ.get("LOCKSTEP_CACHE") or Path.home() / ".cache" / "lockstep"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(final_path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final_path` to write; rename it into place only if the
    writing finished, so a reader never sees a half-written cache entry (several ranks may race)."""
    tmp_path = final_path.with_name(f"{final_path.name}.tmp{os.getpid()}")
    try:
        yield tmp_path
    except BaseException:  # a bad input or Ctrl-C while writing: leave nothing behind
        tmp_path.unlink(missing_ok=True)
        raise
    os.replace(tmp_path, final_path)
