"""lockstep.untrusted: a JSON file lockstep reads back is parsed with bounds (strict UTF-8 with the bad
byte's offset, no NaN or Infinity unless asked, nesting refused past ``max_depth`` by a scan that
ignores brackets inside strings, no lone surrogates) and checked against a shape, and every refusal is
one line naming the file, the dotted key and the fix. This matters because manifests and plans come
from disk and may be damaged or crafted: a traceback from deep inside whatever used a value, a
RecursionError on ``[[[[...``, or a refusal that does not say which key is wrong leaves the user
nothing to act on."""

from __future__ import annotations

import pytest

from lockstep.errors import InputError
from lockstep.untrusted import (
    MAX_DEPTH,
    Bool,
    Int,
    ListOf,
    MapOf,
    Num,
    Obj,
    Optional,
    ShapeError,
    Str,
    load_toml,
    parse_json,
    read_json,
)

MANIFEST = Obj(
    required={"shards": ListOf(Obj(required={"name": Str(pattern=r"[a-z0-9_]+\.bin"), "tokens": Int(min=0)}))},
    optional={"note": Str(), "weights": MapOf(Num(min=0))},
)
FIX = "rebuild the dataset with lockstep prepare"


def _refusal(tmp_path, text: str | bytes, shape=MANIFEST, **kwargs) -> str:
    path = tmp_path / "manifest.json"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(InputError) as caught:
        read_json(path, shape, fix=FIX, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and message.endswith(f"; {FIX}"), message
    return message


def test_a_fitting_file_is_returned_and_unknown_or_null_optional_keys_are_allowed(tmp_path):
    text = '{"shards": [{"name": "a_0.bin", "tokens": 3}], "note": null, "newer_key": [1]}'
    (tmp_path / "m.json").write_text(text)
    assert read_json(tmp_path / "m.json", MANIFEST, fix=FIX)["shards"][0]["tokens"] == 3


def test_a_wrong_shape_names_the_dotted_key_and_what_belongs_there(tmp_path):
    shard = '{"name": "a.bin", "tokens": 1}'
    assert "shards[1].tokens: expected an integer >= 0, found -4" in _refusal(
        tmp_path, f'{{"shards": [{shard}, {{"name": "b.bin", "tokens": -4}}]}}'
    )
    assert "shards[0].tokens: expected an integer >= 0, found true" in _refusal(
        tmp_path, '{"shards": [{"name": "a.bin", "tokens": true}]}'
    )  # a bool is not an integer
    assert "shards[0].name: expected a string matching" in _refusal(
        tmp_path, '{"shards": [{"name": "../a.bin", "tokens": 1}]}'
    )  # the pattern must match the whole string
    assert ": shards: expected a key 'shards'" in _refusal(tmp_path, "{}")
    assert "weights.web: expected a finite number >= 0, found -0.5" in _refusal(
        tmp_path, '{"shards": [], "weights": {"web": -0.5}}'
    )
    assert "the top level: expected an object, found a list" in _refusal(tmp_path, "[]")


def test_parse_refusals_say_what_is_wrong(tmp_path):
    assert "is not UTF-8 (byte 0xff at offset 11)" in _refusal(tmp_path, b'{"shards": \xff}')
    assert "is not valid JSON" in _refusal(tmp_path, '{"shards": [}')
    for constant in ("NaN", "Infinity", "-Infinity"):
        assert f"{constant.lstrip('-')} is not a JSON number" in _refusal(tmp_path, f'{{"x": {constant}}}')
        assert parse_json(f"[{constant}]", allow_nan=True)[0] != 0  # metrics records may hold them
    assert "lone surrogates" in _refusal(tmp_path, '{"shards": [], "note": "\\ud800"}')
    assert parse_json('"\\ud83d\\ude00"') == "\U0001f600"  # a surrogate pair is one character


def test_nesting_is_bounded_before_the_decoder_recurses(tmp_path):
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    with pytest.raises(ValueError, match=f"nests deeper than {MAX_DEPTH} levels"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert f"nests deeper than {MAX_DEPTH} levels" in _refusal(tmp_path, "[" * 200_000)
    brackets_in_strings = '["' + "[{" * MAX_DEPTH + '\\"["]'
    assert parse_json(brackets_in_strings) == ["[{" * MAX_DEPTH + '"[']
    with pytest.raises(ValueError, match="nests deeper than 2 levels"):
        parse_json('{"a": {"b": [1]}}', max_depth=2)
    with pytest.raises(ValueError, match="deeper than Python can read"):
        load_toml("x = " + "[" * 100_000 + "]" * 100_000)


def test_size_limit_missing_file_and_folder_are_one_line(tmp_path):
    text = '{"shards": []}'
    assert f"is {len(text)} bytes, more than the {len(text) - 1}" in _refusal(tmp_path, text, max_bytes=len(text) - 1)
    for path, problem in ((tmp_path / "absent.json", "cannot be read"), (tmp_path, "is not a regular file")):
        with pytest.raises(InputError, match=problem) as caught:
            read_json(path, MANIFEST, fix=FIX)
        assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_combinators_name_the_first_misfit():
    shape = Obj(required={"flags": ListOf(Bool()), "limits": MapOf(Optional(Int(max=9)))})
    shape.check({"flags": [True, False], "limits": {"a": None, "b": 9}})
    for value, key in [
        ({"flags": [True, 1], "limits": {}}, "flags[1]"),
        ({"flags": [], "limits": {"a": 10}}, "limits.a"),
        ({"flags": [], "limits": {"a": 1.0}}, "limits.a"),
    ]:
        with pytest.raises(ShapeError) as caught:
            shape.check(value)
        assert caught.value.key == key
    with pytest.raises(ShapeError, match="found a string of 41 characters"):
        Int().check("x" * 41)


def test_a_key_read_from_the_file_cannot_break_the_one_line_refusal(tmp_path):
    """Map keys come from the file: one holding a newline (or a very long one) is shown quoted with escapes,
    so a crafted file cannot add a line of its own to the error output."""
    message = _refusal(tmp_path, '{"shards": [], "weights": {"web\\nlockstep train: done": -1}}')
    assert "weights.'web\\nlockstep train: done'" in message
    message = _refusal(tmp_path, '{"shards": [], "weights": {"' + "k" * 50 + '": -1}}')
    assert "weights.a string of 50 characters: expected" in message
    assert "weights.web: expected" in _refusal(
        tmp_path, '{"shards": [], "weights": {"web": -1}}'
    )  # plain keys as they are
    with pytest.raises(ShapeError, match=r"shards: expected a key 'shards', found nothing$"):
        MANIFEST.check({})
