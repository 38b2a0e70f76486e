"""One-process commands print what matters: DCP's "torch.distributed is disabled" notice, which it gives
on every single-process save and load, never reaches the user, and `lockstep eval`, which evaluates in
a scratch run folder of its own, announces no launch."""

import os
import subprocess
import sys

from tests.helpers import tiny_overrides

LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")
NOTICE = "torch.distributed is disabled"


def _lockstep(*args) -> str:
    """stdout and stderr of a fresh `lockstep` process (so no earlier import or filter hides a warning)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([LOCKSTEP, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


def test_save_convert_and_eval_in_one_process_print_no_dcp_notice_and_eval_no_launch(tmp_path):
    overrides = [*tiny_overrides(tmp_path), "--training.steps", "2", "--checkpoint.enable"]
    trained = _lockstep("train", "--config", "llama3_debug", *overrides)
    assert "saved checkpoint step 2" in trained and "launch 1 (fresh start)" in trained
    run = tmp_path / "run"
    outputs = {
        "train": trained,
        "to-hf": _lockstep("convert", "to-hf", run, tmp_path / "hf"),
        "from-hf": _lockstep("convert", "from-hf", tmp_path / "hf", tmp_path / "imported"),
        "eval": _lockstep("eval", run, "--validation.steps", "1"),
    }
    assert {command: NOTICE in output for command, output in outputs.items()} == dict.fromkeys(outputs, False)
    lines = outputs["eval"].strip().splitlines()
    assert not [line for line in lines if line.startswith("launch")], lines
    assert lines[-1].startswith("val_loss ")
