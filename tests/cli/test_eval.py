"""``lockstep eval``: the in-loop validation loss, recomputed from what a run left behind, in any layout,
from a step folder or a Hugging Face export, without writing into the run."""

import json
import os
import subprocess
import sys

import pytest

from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.helpers import run_cli, tiny_config, tiny_overrides

VALIDATION = [
    "--validation.steps", "2", "--validation.global_batch_size", "8", "--validation.local_batch_size", "2",
]  # fmt: skip
LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")


def _lockstep(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([LOCKSTEP, *args], capture_output=True, text=True, env=env, timeout=300)


def _files(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run with a checkpoint, evaluated in the loop after step 2."""
    folder = tmp_path_factory.mktemp("eval")
    overrides = ["--training.steps", "2", "--checkpoint.enable", "--validation.enable", "--validation.freq", "2"]
    with Trainer(tiny_config(folder, *overrides, *VALIDATION), show_progress=False) as trainer:
        trainer.train()
    in_loop = [r for r in read_metrics(folder / "run") if "val_loss" in r][-1]
    return folder / "run", in_loop


def test_eval_of_a_run_folder_is_the_in_loop_val_loss(trained):
    run, in_loop = trained
    before = _files(run)
    done = _lockstep("eval", str(run), "--json", *VALIDATION)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout is the JSON object only; notices went to stderr
    assert result["val_loss"] == in_loop["val_loss"] and result["val_tokens"] == in_loop["val_tokens"]
    assert _files(run) == before  # nothing written, touched or removed in the run


def test_eval_of_a_step_folder_on_two_ranks_and_of_an_hf_export(trained, tmp_path):
    run, in_loop = trained
    step = run / "checkpoint" / "step-00000002"
    done = _lockstep("eval", str(step), "--json", "--nproc", "2", *VALIDATION)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["val_loss"] == in_loop["val_loss"]

    exported = tmp_path / "hf"
    assert _lockstep("convert", "to-hf", str(step), str(exported)).returncode == 0
    hf_args = ["--config", "llama3_debug", *tiny_overrides(tmp_path)[2:], *VALIDATION]
    done = _lockstep("eval", str(exported), "--json", *hf_args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["val_loss"] == in_loop["val_loss"]


def test_eval_refusals_are_one_line(trained, tmp_path, capfd):
    """Refused before the Trainer joins a process group (the path, then the config's validation), so
    in this process."""
    run, _ = trained
    for args, needle in [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(tmp_path)], "holds no config.toml"),
        ([str(run), "--validation.steps", "0"], "validation.steps"),
    ]:
        code, _, stderr = run_cli(["eval", *args], capfd)
        assert code == 2, stderr
        assert len(stderr.strip().splitlines()) == 1 and needle in stderr


def test_a_validation_batch_larger_than_the_split_is_one_line(trained):
    """Each microbatch is padded to the full local batch: 100000 windows over a split of about a hundred
    used to grow to 11 GB before failing."""
    run, _ = trained
    done = _lockstep("eval", str(run), "--validation.local_batch_size", "100000",
                     "--validation.global_batch_size", "100000")  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is more than the validation split's" in lines[0] and "Traceback" not in done.stderr


def test_eval_never_reads_the_training_data(tmp_path):
    """A run trained on a json file and validated on another is evaluated after the training file is gone:
    eval reads only the checkpoint and the validation data (no tokenizing pass over the training set)."""
    records = [json.dumps({"text": f"document {i} " * 40}) for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(records[:30]) + "\n")
    (tmp_path / "valid.jsonl").write_text("\n".join(records[30:]) + "\n")
    data = [
        "--training.dataset", "json", "--training.dataset_path", str(tmp_path / "train.jsonl"),
        "--validation.dataset", "json", "--validation.dataset_path", str(tmp_path / "valid.jsonl"),
        "--data.cache_folder", str(tmp_path / "cache"), "--model.tokenizer", "bytes",
    ]  # fmt: skip
    overrides = ["--training.steps", "2", "--checkpoint.enable", "--validation.enable", "--validation.freq", "2"]
    with Trainer(tiny_config(tmp_path, *overrides, *data, *VALIDATION), show_progress=False) as trainer:
        trainer.train()
    in_loop = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r][-1]
    (tmp_path / "train.jsonl").unlink()
    done = _lockstep("eval", str(tmp_path / "run"), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["val_loss"] == in_loop["val_loss"]
