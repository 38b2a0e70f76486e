"""The GPU acceptance run's dry run (issue 27): every stage's command lines and configs parse, the wheel
list resolves, the budgets add up; and its checks catch what they are there for."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("gpus", [1, 2])
def test_the_dry_run_plans_every_stage_within_the_budget(tmp_path, gpus):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--dry-run", "--gpus", str(gpus)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["problems"] == [] and record["dry_run"]
    assert [s["stage"] for s in record["stages"]] == ["cuda_tests", "smoke", "torchtitan", "determinism"]
    assert all(s["status"] == "planned" and s["problems"] == [] for s in record["stages"])
    assert sum(s["budget_s"] for s in record["stages"]) <= record["budget_s"] <= 8 * 60
    labels = {r["label"] for s in record["stages"] for r in s["runs"]}
    assert ({"tp2", "pp2"} <= labels) == (gpus >= 2)
    pytest_command = record["stages"][0]["runs"][0]["command"]
    assert "tests/models/test_cuda.py" in pytest_command and "test_predicted_peak_against_cuda" in pytest_command
    assert (tmp_path / "results.md").read_text().startswith("# GPU acceptance")


def test_a_bad_lockstep_option_or_torchtitan_key_fails_the_dry_run(acceptance, tmp_path, monkeypatch):
    ctx = acceptance.Context(tmp_path, 1, sys.executable, "h100", {}, dry_run=True)
    monkeypatch.setattr(acceptance, "SMOKE_SHAPE", ["--training.seq_lenn", "2048"])
    smoke = next(s for s in acceptance.STAGES if s.name == "smoke")
    result = acceptance.dry_run_stage(ctx, smoke)
    assert result["status"] == "failed" and any("seq_len" in p for p in result["problems"])
    config = tmp_path / "titan.toml"
    config.write_text("[training]\nsteps = 3\nseq_length = 8\n[nonsense]\nx = 1\n")
    assert acceptance.check_titan_config(config) == [
        "torchtitan config: [training] has no seq_length",
        "torchtitan config: no section [nonsense]",
    ]


def test_an_altered_or_unlisted_wheel_is_a_problem(acceptance, tmp_path, monkeypatch):
    pinned = acceptance.pinned_wheels()
    small = min(pinned, key=lambda name: (acceptance.WHEELS / name).stat().st_size)
    shutil.copy(acceptance.WHEELS / small, tmp_path / small)
    (tmp_path / "SHA256SUMS").write_text(f"{pinned[small]}  {small}\n")
    monkeypatch.setattr(acceptance, "WHEELS", tmp_path)
    assert acceptance.check_wheels() == [f"{acceptance.TORCHTITAN_WHEEL}: the torchtitan stage needs it"]
    with open(tmp_path / small, "ab") as f:
        f.write(b"x")
    (tmp_path / "extra-1.0-py3-none-any.whl").write_bytes(b"")
    problems = acceptance.check_wheels()
    assert f"{small}: its sha256 differs from SHA256SUMS" in problems
    assert "extra-1.0-py3-none-any.whl: not in SHA256SUMS" in problems


def test_missing_wheels_are_unpacked_and_present_ones_are_not(acceptance, tmp_path):
    unpacked = acceptance.unpack_missing_wheels(tmp_path / "site")
    assert acceptance.TORCHTITAN_WHEEL in unpacked and (tmp_path / "site" / "torchtitan" / "train.py").is_file()
    assert not any(name.startswith(("rich-", "xxhash-", "pytest-")) for name in unpacked)  # installed here


def test_torchtitan_gets_lockstep_tokenizer_and_corpus_and_the_datasets_stand_in_reads_it(acceptance, tmp_path):
    cache = tmp_path / "cache"
    (cache / "builtin-tokenizer-x").mkdir(parents=True)
    (cache / "builtin-tokenizer-x" / "tokenizer.json").write_text("{}")
    (cache / "builtin-corpus").mkdir()
    rows = [{"text": f"document {i}"} for i in range(5)]
    (cache / "builtin-corpus" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    acceptance.prepare_torchtitan(tmp_path, stand_in=True)
    folder = tmp_path / "torchtitan"
    assert (folder / "tokenizer" / "tokenizer.json").read_text() == "{}"
    done = subprocess.run(
        [sys.executable, "-c", (
            "from datasets import load_dataset; from datasets.distributed import split_dataset_by_node as split\n"
            f"ds = load_dataset({str(folder / 'data')!r}, split='train')\n"
            "print(len(ds), [r['text'] for r in split(ds, 1, 2)], [r['text'] for r in ds.skip(3)])"
        )],
        capture_output=True, text=True, cwd=folder / "stand_ins", timeout=60,
    )  # fmt: skip
    assert done.stdout.strip() == "5 ['document 1', 'document 3'] ['document 3', 'document 4']", done.stderr
