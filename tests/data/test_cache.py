"""lockstep.data.cache: the cache folder is data.cache_folder, else $LOCKSTEP_CACHE, else
~/.cache/lockstep, created on first use; ``atomic_path`` writes beside the final path and renames into
place only when the writing finished, so a failed or interrupted write (an exception or Ctrl-C) leaves
neither a half-written entry nor a stray temporary file, and an entry already there stays intact. This
matters because several ranks may build the same cached corpus, tokenizer or dataset at once: a reader
that could see a half-written file would train on a truncated dataset without an error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lockstep.data.cache import atomic_path, cache_root


def test_cache_folder_then_environment_then_home_and_created(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCKSTEP_CACHE", str(tmp_path / "from_env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(str(tmp_path / "given" / "deep")) == tmp_path / "given" / "deep"
    assert (tmp_path / "given" / "deep").is_dir()
    assert cache_root() == tmp_path / "from_env" and (tmp_path / "from_env").is_dir()
    monkeypatch.delenv("LOCKSTEP_CACHE")
    assert cache_root() == tmp_path / "home" / ".cache" / "lockstep"
    assert (tmp_path / "home" / ".cache" / "lockstep").is_dir()


def test_the_entry_appears_only_once_the_write_finished(tmp_path):
    final = tmp_path / "tokens.bin"
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp != final  # same folder: the rename is atomic
        tmp.write_bytes(b"half")
        assert not final.exists()
        tmp.write_bytes(b"whole entry")
    assert final.read_bytes() == b"whole entry"
    assert os.listdir(tmp_path) == ["tokens.bin"]


@pytest.mark.parametrize("interrupt", [ValueError("bad input"), KeyboardInterrupt()])
def test_a_failed_write_leaves_nothing_and_keeps_the_old_entry(tmp_path, interrupt):
    fresh = tmp_path / "fresh.bin"
    with pytest.raises(type(interrupt)):
        with atomic_path(fresh) as tmp:
            tmp.write_bytes(b"partial")
            raise interrupt
    assert os.listdir(tmp_path) == []

    old = tmp_path / "old.bin"
    old.write_bytes(b"old entry")
    with pytest.raises(type(interrupt)):
        with atomic_path(old) as tmp:
            tmp.write_bytes(b"partial")
            raise interrupt
    assert old.read_bytes() == b"old entry" and os.listdir(tmp_path) == ["old.bin"]


def test_a_finished_write_replaces_an_existing_entry(tmp_path):
    final = tmp_path / "entry.json"
    final.write_text("old")
    with atomic_path(final) as tmp:
        Path(tmp).write_text("new")
        assert final.read_text() == "old"
    assert final.read_text() == "new" and os.listdir(tmp_path) == ["entry.json"]
