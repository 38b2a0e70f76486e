"""Every bad input ends as one line naming the file (and line or record) and the fix, exit code 2.

Run through ``lockstep.cli.main`` in-process (it returns the exit code); one subprocess test checks
that the user really sees a single line and no traceback.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lockstep.cli import main
from lockstep.config import ConfigError, load_config, validate_job_config
from lockstep.run.folder import read_metrics
from lockstep.run.jsonl import json_floats, strict_json
from tests.helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``lockstep train ARGV``; assert exit 2 and one error line, no traceback; return the line."""
    code = main(["train", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lockstep train: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _data_args(tmp_path: Path, kind: str, path: Path, *more: str) -> list[str]:
    """The tiny run on a user dataset with the bytes tokenizer (nothing to train) and its own cache."""
    return [
        "--config", "llama3_debug", *tiny_overrides(tmp_path), "--model.tokenizer", "bytes",
        "--data.cache_folder", str(tmp_path / "cache"), "--training.dataset", kind,
        "--training.dataset_path", str(path), *more,
    ]  # fmt: skip


def _no_cache_entry(tmp_path: Path) -> bool:
    """No usable cache entry: a prepared cache folder is used only once its manifest is written."""
    return not any((tmp_path / "cache").glob("prepared/*/manifest.json"))


# --- config files and options -------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, fragments",
    [
        (b"[training]\nsteps = 3\n[model\n", ["bad.toml:3:7: invalid TOML", "fix the TOML syntax"]),
        (b"[job]\ndescription = '\xe9t\xe9'\n", ["bad.toml:2: is not UTF-8 (byte 0xe9)", "save the file as UTF-8"]),
    ],
)
def test_bad_toml(tmp_path, capsys, content, fragments):
    (tmp_path / "bad.toml").write_bytes(content)
    line = _error_line(capsys, ["--config", str(tmp_path / "bad.toml")])
    for fragment in fragments:
        assert fragment in line


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["--training.dataset_path", "x.jsonl"], "training.dataset_path", "no effect with training.dataset = builtin"),
        (["--model.tokenizer_path", "t.json"], "model.tokenizer_path", "set model.tokenizer = hf"),
        (["--parallelism.pipeline_parallel_split_points", "layers.1"], "parallelism.pipeline_parallel_split_points",
         "without pipeline parallelism"),
        (["--optimizer.betas", "[0.9, 0.99"], "optimizer.betas", "does not close it"),
        (["--debug.max_consecutive_skips", "0"], "debug.max_consecutive_skips", "must be >= 1"),
    ],
)  # fmt: skip
def test_options_without_effect_and_bad_lists(capsys, overrides, key, fragment):
    line = _error_line(capsys, ["--config", "llama3_debug", *overrides])
    assert f"error: {key}: " in line and fragment in line


def test_lists_in_toml_or_json_syntax():
    for betas in ("0.8,0.99", "[0.8, 0.99]", "[0.8,0.99]"):
        assert load_config("llama3_debug", ["--optimizer.betas", betas]).optimizer.betas == (0.8, 0.99)
    for components in ('["model"]', "['model']", "[model]", "model"):
        assert load_config("llama3_debug", ["--compile.components", components]).compile.components == ["model"]
    assert load_config("llama3_debug", ["--compile.components", "[model, loss]"]).compile.components == [
        "model",
        "loss",
    ]


def test_wandb_missing_is_refused_at_validation(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    line = _error_line(capsys, ["--config", "llama3_debug", "--metrics.enable_wandb"])
    assert "metrics.enable_wandb: needs the wandb package" in line and "pip install wandb" in line


def test_power_of_two_suggestions_pass_their_own_check(capsys):
    # FSDP 3 with two microbatches per rank: a micro-step's reduce-scatter sums a run of 3, not a subtree
    line = _error_line(capsys, ["--config", "llama3_debug", "--nproc", "3", "--training.global_batch_size", "48"])
    assert "power-of-two shard degree, or one microbatch per rank (global_batch_size = 24" in line
    validate_job_config(load_config("llama3_debug", ["--training.global_batch_size", "24"]), 3)
    hsdp = ["--parallelism.data_parallel_replicate_degree", "2"]  # x 2 shards on 4 ranks
    config = load_config("llama3_debug", hsdp + ["--training.global_batch_size", "96"])  # 3 microbatches per rank
    with pytest.raises(ConfigError, match="use global_batch_size = 64 or 128"):
        validate_job_config(config, 4)
    for suggested in ("64", "128"):
        validate_job_config(load_config("llama3_debug", hsdp + ["--training.global_batch_size", suggested]), 4)


# --- datasets and tokenizers ----------------------------------------------------------------------

GOOD = json.dumps({"text": "a document " * 20})


@pytest.mark.parametrize(
    "name, lines, fragments",
    [
        ("x.jsonl", [GOOD, GOOD, '{"text": "cut off'], ["x.jsonl:line 3: invalid JSON", "fix or drop that line"]),
        ("x.jsonl", [GOOD, '{"body": "no text"}'], ["x.jsonl:line 2: record has no field 'text'; its fields: body",
                                                     "set data.text_field"]),
        ("x.jsonl", [GOOD, "", '{"text": 42}'], ["x.jsonl:line 3: field 'text' is int, not a string"]),
        ("x.jsonl", [GOOD, "[1, 2]"], ["x.jsonl:line 2: a record must be a JSON object; got list"]),
        ("x.json", [f'[{GOOD}, {{"text": null}}]'], ["x.json:record 1: field 'text' is NoneType"]),
        ("x.json", ['[{"text": "a",'], ["x.json:2:1: invalid JSON", "fix the JSON there"]),
        ("x.jsonl", [], ["x.jsonl: holds no documents", "point training.dataset_path at non-empty data"]),
        ("x.jsonl", ['{"text": "tiny"}'], ["x.jsonl: has 6 tokens", "seq_len + 1 = 33",
                                           "training.seq_len <= 5 would fit"]),
    ],
)  # fmt: skip
def test_bad_json_datasets(tmp_path, capsys, name, lines, fragments):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    line = _error_line(capsys, _data_args(tmp_path, "json", path))
    for fragment in fragments:
        assert fragment in line
    if "tokens" not in line and "no documents" not in line:  # those are whole, valid cache entries
        assert _no_cache_entry(tmp_path)


def test_non_utf8_text_file(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    line = _error_line(capsys, _data_args(tmp_path, "text", path))
    assert "latin1.txt:line 2: is not UTF-8 (byte 0xe9)" in line and "iconv" in line
    assert _no_cache_entry(tmp_path)


def test_bad_parquet_files(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all" * 10)
    line = _error_line(capsys, _data_args(tmp_path, "parquet", garbage))
    assert "garbage.parquet: not a readable parquet file" in line
    no_column = tmp_path / "body.parquet"
    pq.write_table(pa.table({"body": ["some text"]}), no_column)
    line = _error_line(capsys, _data_args(tmp_path, "parquet", no_column))
    assert "body.parquet: has no column 'text'; its columns: body" in line and "data.text_field" in line
    assert _no_cache_entry(tmp_path)


def test_bad_tokenizer_files(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("words " * 200)
    base = _data_args(tmp_path, "text", text, "--model.tokenizer", "hf")
    garbage = tmp_path / "tok" / "tokenizer.json"
    garbage.parent.mkdir()
    garbage.write_text('{"version": "1.0", "model": ')
    line = _error_line(capsys, [*base, "--model.tokenizer_path", str(garbage.parent)])
    assert f"{garbage}: not a Hugging Face tokenizer.json" in line and "model.tokenizer_path" in line
    assert _no_cache_entry(tmp_path)


# --- non-finite steps and metrics.jsonl ----------------------------------------------------------


def _diverging_args(tmp_path: Path, *more: str) -> list[str]:
    """An absurd learning rate: step 1 is finite, its update makes every later step non-finite."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37}" for i in range(1500)))
    return _data_args(tmp_path, "text", text, "--optimizer.lr", "1e30", *more)


def test_nonfinite_stop_is_one_line(tmp_path, capsys):
    line = _error_line(capsys, _diverging_args(tmp_path))
    assert "at step 2; first non-finite value: layers." in line


def test_nonfinite_skip_stops_after_consecutive_skips(tmp_path, capsys):
    args = _diverging_args(tmp_path, "--debug.nonfinite", "skip", "--debug.max_consecutive_skips", "3")
    line = _error_line(capsys, args)
    assert "steps 2-4 were all non-finite and skipped (debug.max_consecutive_skips = 3)" in line
    raw = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    for text in raw:  # strict JSON: no bare NaN/Infinity tokens
        json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token} in metrics.jsonl"))
    assert '"NaN"' in raw[1] or '"Infinity"' in raw[1]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert math.isfinite(records[0]["loss"]) and not math.isfinite(records[1]["grad_norm"])


def test_strict_json_round_trip():
    record = {"step": 1, "loss": math.nan, "a": [math.inf, -math.inf, 1.5], "b": {"c": "text"}}
    text = json.dumps(strict_json(record), allow_nan=False)
    back = json_floats(json.loads(text))
    assert math.isnan(back["loss"]) and back["a"] == [math.inf, -math.inf, 1.5] and back["b"] == {"c": "text"}


def test_user_sees_one_line_without_traceback(tmp_path):
    (tmp_path / "bad.toml").write_text("[training\n")
    done = subprocess.run(
        [sys.executable, "-m", "lockstep", "train", "--config", str(tmp_path / "bad.toml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("lockstep train: error: ")
    assert f"{tmp_path / 'bad.toml'}:1:" in done.stderr


def test_missing_load_step_lists_the_published_steps(tmp_path, capsys):
    args = ["--config", "llama3_debug", *tiny_overrides(tmp_path), "--training.steps", "2", "--checkpoint.enable"]
    assert main(["train", *args]) == 0
    line = _error_line(capsys, [*args, "--checkpoint.load_step", "5"])
    assert "no checkpoint for step 5 (published steps: 2)" in line


def test_a_torn_metrics_line_does_not_stop_the_resume(tmp_path, capsys):
    """A crash or a full disk can cut metrics.jsonl's last line; the resume moves it aside."""
    args = ["--config", "llama3_debug", *tiny_overrides(tmp_path), "--checkpoint.enable", "--checkpoint.interval", "2"]
    assert main(["train", *args, "--training.steps", "4"]) == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])
    assert main(["train", *args, "--training.steps", "6"]) == 0
    # step 4's record was the torn one: resumed from step 4's checkpoint, it is not recomputed
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3, 5, 6]
    assert '{"step": 4' in (tmp_path / "run" / "metrics.rewound.jsonl").read_text()  # kept, not lost


def test_a_file_where_the_next_launch_goes_is_one_line(tmp_path, capsys):
    args = ["--config", "llama3_debug", *tiny_overrides(tmp_path), "--training.steps", "2"]
    assert main(["train", *args]) == 0
    (tmp_path / "run" / "launches" / "002").write_text("junk")
    assert "cannot record this launch" in _error_line(capsys, args)


def test_compare_of_a_run_with_itself_is_refused(tmp_path, capsys):
    args = ["--config", "llama3_debug", *tiny_overrides(tmp_path), "--training.steps", "2"]
    assert main(["train", *args]) == 0
    (tmp_path / "link").symlink_to(tmp_path / "run")
    assert main(["compare", str(tmp_path / "run"), str(tmp_path / "link"), "--assert-equal"]) == 2
    assert "compared with itself" in capsys.readouterr().err


def test_flex_attention_on_the_cpu_is_one_line(tmp_path, capsys):
    """Explicit flex is refused off CUDA (auto would pick sdpa there); torch 2.13 has no CPU backward."""
    line = _error_line(capsys, ["--config", "llama3_debug", *tiny_overrides(tmp_path), "--model.attention", "flex"])
    assert "model.attention: FlexAttention has no CPU backward" in line
