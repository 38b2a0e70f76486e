"""The automatic preparation of raw files into the cache: a failed one leaves nothing that passes for a
finished entry, the next start finishes it as a clean start would, and only lockstep's own unfinished
folders are ever removed."""

import json
import random

import pytest

from lockstep.data import shard_writer
from lockstep.data.auto_prepare import prepare_cached
from lockstep.data.prepare import PARTIAL_MARKER
from lockstep.data.sources import file_source
from lockstep.data.tokenizer import BytesTokenizer

SHARD_BYTES = 4 << 10


def _corpus(folder) -> None:
    rng = random.Random(2)
    documents = [" ".join(rng.choice("ab cd ef gh".split()) for _ in range(rng.randint(1, 80))) for _ in range(400)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[:300]))
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[300:]))


def _prepare(corpus, cache):
    return prepare_cached(
        file_source("json", str(corpus), "text"), BytesTokenizer(), str(cache), shard_bytes=SHARD_BYTES
    )


def _fail_after_two_shards(monkeypatch) -> None:
    encode, calls = shard_writer._encode, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return encode(*args)

    monkeypatch.setattr(shard_writer, "_encode", failing)


def _contents(folder) -> dict[str, bytes]:
    """Every file of a prepared folder but the job locks, by relative path."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".prepare-job-"))
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def _entries(cache) -> list[str]:
    return sorted(p.name for p in (cache / "prepared").iterdir() if p.is_dir())


def test_a_failed_preparation_leaves_no_entry_and_the_next_start_finishes_it_as_a_clean_start(tmp_path, monkeypatch):
    _corpus(tmp_path / "in")
    _fail_after_two_shards(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        _prepare(tmp_path / "in", tmp_path / "cache")
    monkeypatch.undo()
    (partial,) = _entries(tmp_path / "cache")
    assert partial.endswith(".partial")  # nothing under an entry's own name
    left = tmp_path / "cache" / "prepared" / partial
    assert (left / PARTIAL_MARKER).is_file() and not (left / "manifest.json").exists()
    assert sorted(p.name for p in (left / "shards").glob("*.json")) == ["00000.json", "00001.json"]

    folder, prepared = _prepare(tmp_path / "in", tmp_path / "cache")
    assert prepared and _entries(tmp_path / "cache") == [folder.name] == [partial.removesuffix(".partial")]
    clean, _ = _prepare(tmp_path / "in", tmp_path / "clean")
    assert _contents(folder) == _contents(clean) and "manifest.json" in _contents(folder)
    assert _prepare(tmp_path / "in", tmp_path / "cache") == (folder, False)


def test_an_unfinished_entry_of_changed_files_is_removed_and_nothing_else(tmp_path, monkeypatch, capsys):
    _corpus(tmp_path / "in")
    _fail_after_two_shards(monkeypatch)
    with pytest.raises(RuntimeError):
        _prepare(tmp_path / "in", tmp_path / "cache")
    monkeypatch.undo()
    root = tmp_path / "cache" / "prepared"
    (stale,) = _entries(tmp_path / "cache")
    (root / "mine.partial").mkdir()  # no marker: not lockstep's
    (root / "mine.partial" / "notes.txt").write_text("keep me")
    other = root / "other.partial"  # lockstep's, for other files
    other.mkdir()
    (other / PARTIAL_MARKER).write_text(json.dumps({"paths": ["/elsewhere/x.jsonl"], "tokenizer": "t", "files": []}))
    with open(tmp_path / "in" / "b.jsonl", "a") as f:  # the files change (a bad record fixed, say)
        f.write(json.dumps({"text": "one more"}) + "\n")
    capsys.readouterr()
    folder, _ = _prepare(tmp_path / "in", tmp_path / "cache")
    assert _entries(tmp_path / "cache") == sorted([folder.name, "mine.partial", "other.partial"])
    assert f"removed {root / stale}: an unfinished preparation of these files" in capsys.readouterr().err
    assert (root / "mine.partial" / "notes.txt").read_text() == "keep me"


def test_an_unfinished_entry_of_an_older_lockstep_is_resumed(tmp_path, monkeypatch):
    """Before partial folders, an interrupted preparation lay under the entry's own name, unmarked."""
    _corpus(tmp_path / "in")
    _fail_after_two_shards(monkeypatch)
    with pytest.raises(RuntimeError):
        _prepare(tmp_path / "in", tmp_path / "cache")
    monkeypatch.undo()
    root = tmp_path / "cache" / "prepared"
    (partial,) = _entries(tmp_path / "cache")
    (root / partial / PARTIAL_MARKER).unlink()
    (root / partial).rename(root / partial.removesuffix(".partial"))
    folder, prepared = _prepare(tmp_path / "in", tmp_path / "cache")
    assert prepared and _entries(tmp_path / "cache") == [folder.name]
    assert _contents(folder) == _contents(_prepare(tmp_path / "in", tmp_path / "clean")[0])
