"""The one JSON Lines writer: the bytes of each kind of file, flushing, rotation and rewind."""

import json
import math

from lockstep.run.jsonl import JsonlWriter, json_floats, keep_numbered, record_step, rewind


def test_a_plain_record_is_json_dumps_and_a_newline(tmp_path):
    writer = JsonlWriter(tmp_path / "a" / "f.jsonl", make_folder=True)
    record = {"step": 3, "x": 0.1 + 0.2, "d": {"w": "01"}}
    writer.append(record)
    writer.append({"step": 4})
    assert (tmp_path / "a" / "f.jsonl").read_text() == json.dumps(record) + "\n" + json.dumps({"step": 4}) + "\n"


def test_a_strict_record_names_the_non_finite_floats(tmp_path):
    writer = JsonlWriter(tmp_path / "m.jsonl", strict=True)
    writer.append({"step": 1, "loss": math.nan, "v": [math.inf, -math.inf, 1.5]})
    text = (tmp_path / "m.jsonl").read_text()
    assert text == '{"step": 1, "loss": "NaN", "v": ["Infinity", "-Infinity", 1.5]}\n'
    back = json_floats(json.loads(text))
    assert math.isnan(back["loss"]) and back["v"] == [math.inf, -math.inf, 1.5]


def test_a_kept_open_file_is_flushed_at_each_record(tmp_path):
    writer = JsonlWriter(tmp_path / "m.jsonl", keep_open=True, fsync=True)
    writer.append({"step": 1})
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1}\n'  # readable before the close
    writer.close()
    writer.close()  # twice is harmless


def test_keep_numbered_takes_the_first_free_number(tmp_path):
    for name in ("m.jsonl", "m.1.jsonl"):
        (tmp_path / name).write_text(name)
    assert keep_numbered(tmp_path / "m.jsonl") == tmp_path / "m.2.jsonl"
    assert (tmp_path / "m.2.jsonl").read_text() == "m.jsonl" and not (tmp_path / "m.jsonl").exists()


def test_rewind_moves_later_and_torn_records_aside(tmp_path):
    path, aside = tmp_path / "m.jsonl", tmp_path / "m.rewound.jsonl"
    aside.write_text('{"step": 9}\n')
    path.write_text('{"step": 1}\n{"step": 2}\n\n{"step": 3}\n{"ste')
    rewind(path, 2, aside)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert aside.read_text() == '{"step": 9}\n{"step": 3}\n{"ste\n'
    rewind(path, 2, aside)  # nothing past step 2: nothing moves
    assert aside.read_text().count("\n") == 3
    assert record_step("not json") == math.inf
