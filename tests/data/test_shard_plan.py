"""lockstep.data.shard_plan, planned directly (nothing tokenized): a JSON Lines file's shards are byte
ranges that tile it exactly, each starting just after a newline, so every record lands whole in exactly
one shard; each shard but the last reaches the target size and passes it by less than one line; the cuts
are a function of the file and the target alone; whole-document formats (.txt, .json, parquet) are never
cut; and the plan's identity moves with a file's size or modification time. This matters because workers
tokenize shards independently and the manifest concatenates them: a gap, an overlap or a split record
would silently drop, duplicate or corrupt documents, and an identity blind to an edit would make a stale
preparation look current. tests/data/test_prepare.py checks the tokens that come out end to end; these
are the plan's own guarantees, at cut positions chosen to hit line ends exactly."""

from __future__ import annotations

import json
import os

from lockstep.data.shard_plan import identity, plan_files, reader_kind
from lockstep.data.sources import DocumentSource, file_source


def _jsonl(path, count: int) -> bytes:
    """Records of irregular lengths (1 to 97 characters of text), the last line without its newline."""
    lines = [json.dumps({"text": "x" * (1 + (i * 37) % 97), "i": i}) for i in range(count)]
    raw = "\n".join(lines).encode()
    path.write_bytes(raw)
    return raw


def test_jsonl_shards_tile_the_file_and_cut_only_after_newlines(tmp_path):
    raw = _jsonl(tmp_path / "a.jsonl", 400)
    longest = max(len(line) + 1 for line in raw.split(b"\n"))
    for shard_bytes in (1, 50, 64, 1000, 4096, len(raw) - 1, len(raw), len(raw) + 1):
        _, tasks = plan_files(file_source("json", str(tmp_path / "a.jsonl"), "text"), shard_bytes)
        starts, ends = [t.start for t in tasks], [t.end for t in tasks]
        assert starts[0] == 0 and ends[-1] == len(raw) and starts[1:] == ends[:-1], shard_bytes
        assert all(raw[t.start - 1 : t.start] == b"\n" for t in tasks[1:]), shard_bytes
        for task in tasks[:-1]:  # the target reached, overshot by the rest of one line at most
            assert shard_bytes <= task.end - task.start < shard_bytes + longest, (shard_bytes, task)
        records = [line for t in tasks for line in raw[t.start : t.end].split(b"\n") if line]
        assert records == raw.split(b"\n"), shard_bytes  # every record whole, once, in order
        assert [t.input_bytes for t in tasks] == [t.end - t.start for t in tasks]


def test_a_cut_target_on_a_line_start_still_cuts_after_a_newline(tmp_path):
    """Lines of one length L and a target of 3L: every target falls exactly on a line's first byte, and the
    cut goes to the end of that line (4L past the last cut), so the shards are whole runs of 4 lines."""
    path = tmp_path / "even.jsonl"
    line = json.dumps({"text": "abcdefgh"}) + "\n"
    path.write_text(line * 20)
    _, tasks = plan_files(file_source("json", str(path), "text"), 3 * len(line))
    expected = list(range(0, 20 * len(line) + 1, 4 * len(line)))
    assert [t.start for t in tasks] + [tasks[-1].end] == expected


def test_the_cuts_depend_on_the_files_and_target_only(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        _jsonl(tmp_path / name, 120)
    first = plan_files(file_source("json", str(tmp_path), "text"), 300)
    again = plan_files(file_source("json", str(tmp_path), "text"), 300)
    alone = plan_files(file_source("json", str(tmp_path / "a.jsonl"), "text"), 300)
    assert first == again
    a_tasks = [(t.start, t.end) for t in first[1] if t.path.endswith("a.jsonl")]
    assert a_tasks == [(t.start, t.end) for t in alone[1]]  # a file's cuts do not depend on its neighbours


def test_whole_document_files_are_one_shard_each_and_named_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    files = {
        "a.json": b'[{"text": "' + b"y" * 500 + b'"}]',
        "b.jsonl": None,
        "sub/c.json": b'{"text": "' + b"z" * 300 + b'"}',
    }
    for name, content in files.items():
        if content is None:
            _jsonl(tmp_path / name, 50)
        else:
            (tmp_path / name).write_bytes(content)
    record, tasks = plan_files(file_source("json", str(tmp_path), "text"), 100)
    names = [f["name"] for f in record["files"]]
    assert names == ["a.json", "b.jsonl", "sub/c.json"]  # relative to the source's folder
    assert [t.name for t in tasks] == [f"{i:05d}" for i in range(len(tasks))]
    by_file = {n: [t for t in tasks if names[t.file_index] == n] for n in names}
    for name in ("a.json", "sub/c.json"):
        (task,) = by_file[name]
        size = (tmp_path / name).stat().st_size
        assert (task.kind, task.start, task.end) == ("json", 0, size) and size > 100
    assert len(by_file["b.jsonl"]) > 1 and {t.kind for t in by_file["b.jsonl"]} == {"jsonl"}
    assert [t.file_index for t in tasks] == sorted(t.file_index for t in tasks)
    assert all(record["files"][t.file_index]["size"] == os.path.getsize(t.path) for t in tasks)
    text = tmp_path / "long.txt"
    text.write_text("line\n" * 1000)
    (task,) = plan_files(DocumentSource("text", (text,)), 10)[1]
    assert (task.kind, task.start, task.end) == ("text", 0, 5000)
    assert reader_kind("parquet", tmp_path / "x.jsonl") == "parquet"
    assert (
        reader_kind("builtin", tmp_path / "x.jsonl") == "jsonl" and reader_kind("json", tmp_path / "x.json") == "json"
    )


def test_the_identity_moves_with_a_files_size_or_time_and_not_with_key_order(tmp_path):
    path = tmp_path / "a.jsonl"
    _jsonl(path, 30)
    record = plan_files(file_source("json", str(path), "text"))[0]
    base = identity(record)
    assert identity(dict(reversed(list(record.items())))) == base
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    touched = plan_files(file_source("json", str(path), "text"))[0]
    assert touched["files"][0]["mtime_ns"] == stat.st_mtime_ns + 1 and identity(touched) != base
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert identity(plan_files(file_source("json", str(path), "text"))[0]) == base
    with open(path, "ab") as f:
        f.write(b"\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same time, one byte more
    assert identity(plan_files(file_source("json", str(path), "text"))[0]) != base
