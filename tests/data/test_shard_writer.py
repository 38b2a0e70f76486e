"""lockstep.data.shard_writer: a record that does not parse, read by a worker process from a byte range of
a file, is named by its file and line in the whole file, and no manifest is written."""

import json

import pytest

from lockstep.errors import LockstepError
from tests.data.test_prepare import _documents, _prepare


def test_a_bad_record_in_a_worker_names_its_line(tmp_path):
    documents = _documents(400)
    lines = [json.dumps({"text": d}) for d in documents]
    lines[350] = '{"text": "unterminated'
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(LockstepError, match=r"a\.jsonl:line 351: invalid JSON"):
        _prepare(tmp_path / "in", tmp_path / "out", shard_bytes=4 << 10, workers=2, tokenizer_threads=1)
    assert not (tmp_path / "out" / "manifest.json").exists()
