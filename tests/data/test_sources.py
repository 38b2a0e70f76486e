"""lockstep.data.sources, read directly (no tokenizer, no cache, no CLI): a source's documents are the
files' texts in one fixed order, whatever form a json dataset takes (an array, one object, or JSON Lines
under a .json name), with text files' line ends normalised; its fingerprint changes with anything that
changes those documents (content, a file's name, the text field) and with nothing else; a folder is its
matching files, sorted; and a record whose text no tokenizer can take is refused naming the file, the
record and the fix. These matter because the fingerprint is what decides whether a tokenized cache, and a
resumed run, still matches its data: a fingerprint blind to a change reuses stale tokens, one that moves
without a change re-tokenizes (or refuses a resume) for nothing. The end-to-end refusals through
``lockstep train`` are in tests/test_bad_inputs.py; these are the pieces under them."""

from __future__ import annotations

import json

import pytest

from lockstep.config.errors import ConfigError
from lockstep.data.sources import DocumentSource, file_source, json_texts
from lockstep.errors import InputError


def test_the_three_forms_of_a_json_file_give_the_same_documents(tmp_path):
    records = [{"text": "first", "id": 1}, {"text": "second\nline"}, {"text": "third"}]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(records))
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name: "Extra data" after the first record
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    jsonl = tmp_path / "lines.jsonl"
    jsonl.write_text("\n" + "\n\n".join(json.dumps(r) for r in records) + "\n\n")  # blank lines are skipped
    expected = [r["text"] for r in records]
    for file in (array, lines, jsonl):
        assert list(json_texts(file, "text")) == expected, file.name
    single = tmp_path / "single.json"  # one object: JSON Lines of one line
    single.write_text(json.dumps(records[0]))
    assert list(json_texts(single, "text")) == ["first"]


def test_a_text_file_is_one_document_with_every_line_end_made_a_newline(tmp_path):
    file = tmp_path / "mixed.txt"
    file.write_bytes(b"unix\nwindows\r\nold mac\rend")
    (document,) = DocumentSource("text", (file,)).documents()
    assert document == "unix\nwindows\nold mac\nend"


def test_the_fingerprint_moves_with_the_documents_and_only_with_them(tmp_path):
    first, second = tmp_path / "a" / "x.jsonl", tmp_path / "b" / "x.jsonl"
    for file in (first, second):
        file.parent.mkdir()
        file.write_text('{"text": "same", "title": "t"}\n')
    base = DocumentSource("json", (first,)).fingerprint()
    assert DocumentSource("json", (second,)).fingerprint() == base  # the folder is not part of the data
    assert DocumentSource("json", (first,)).fingerprint() == base  # and reading twice gives the same
    assert DocumentSource("json", (first,), text_field="title").fingerprint() != base
    assert DocumentSource("text", (first,)).fingerprint() != base
    renamed = tmp_path / "b" / "y.jsonl"
    second.rename(renamed)
    assert DocumentSource("json", (renamed,)).fingerprint() != base
    first.write_text('{"text": "Same", "title": "t"}\n')  # one byte changed
    assert DocumentSource("json", (first,)).fingerprint() != base
    both = DocumentSource("json", (first, renamed)).fingerprint()
    assert DocumentSource("json", (renamed, first)).fingerprint() != both  # the order is the documents' order


def test_a_folder_is_its_files_of_the_kind_sorted_at_any_depth(tmp_path):
    for name in ("b.jsonl", "a.json", "sub/c.jsonl", "sub/deeper/0.json", "notes.txt", "data.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n')
    source = file_source("json", str(tmp_path), "text")
    assert source.files == tuple(sorted(p for p in tmp_path.rglob("*") if p.suffix in (".json", ".jsonl")))
    # sorted by path parts: "sub/c.jsonl" before "sub/deeper/0.json" ("c" < "deeper"), top-level first
    assert [p.name for p in source.files] == ["a.json", "b.jsonl", "c.jsonl", "0.json"]
    assert source.location == str(tmp_path)
    one = file_source("text", str(tmp_path / "notes.txt"), "text")
    assert one.files == (tmp_path / "notes.txt",) and one.location == str(tmp_path / "notes.txt")


def test_a_path_with_nothing_to_read_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^validation\.dataset_path: no such file or folder: .*missing$"):
        file_source("json", str(tmp_path / "missing"), "text", key="validation.dataset_path")
    (tmp_path / "only.txt").write_text("words")
    with pytest.raises(ConfigError, match=r"^training\.dataset_path: no \.json/\.jsonl files under "):
        file_source("json", str(tmp_path), "text")


def test_unreadable_records_are_refused_in_one_line_naming_file_line_and_fix(tmp_path):
    surrogate = tmp_path / "s.jsonl"
    surrogate.write_text('{"text": "fine"}\n{"text": "bad \\ud800 escape"}\n')
    with pytest.raises(InputError) as caught:
        list(json_texts(surrogate, "text"))
    message = str(caught.value)
    assert message.startswith(f"{surrogate}:line 2: ") and "\\ud800" in message and "fix or drop" in message
    assert "\n" not in message
    deep = tmp_path / "d.json"
    deep.write_text('{"text": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(InputError, match=r"d\.json: the record nests deeper than a JSON reader can follow"):
        list(json_texts(deep, "text"))


def test_a_json_record_that_is_not_utf8_is_named_as_such_not_as_invalid_json(tmp_path):
    """decode_text's line (the byte, the iconv fix) reaches the user whole, in JSON Lines and in a .json file."""
    lines = tmp_path / "l.jsonl"
    lines.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError) as caught:
        list(json_texts(lines, "text"))
    assert str(caught.value).startswith(f"{lines}:line 3: is not UTF-8 (byte 0xe9)") and "iconv" in str(caught.value)
    assert "invalid JSON" not in str(caught.value)
    whole = tmp_path / "w.json"
    whole.write_bytes(b'[{"text": "caf\xe9"}]')
    with pytest.raises(InputError, match="is not UTF-8") as caught:
        list(json_texts(whole, "text"))
    assert "invalid JSON" not in str(caught.value)
