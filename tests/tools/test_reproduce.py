"""lockstep replay (lockstep.tools.reproduce): does step N of a run reproduce on this machine, and if
not, which rank and module computed another number."""

import os
import subprocess
import sys

from lockstep.run.folder import read_metrics

LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")


def test_replay_reproduces_a_step_or_names_the_faulty_rank_and_module(tmp_path, monkeypatch):
    """Rank 1 of 2 computes a slightly wrong feed-forward at step 4 (a simulated silent hardware fault,
    tests/assets/faulty_rank.py, switched on by the environment of the run only). Replaying step 4 on
    this "healthy machine" names rank 1 and the first module whose output changed."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, *sys.path]))
    command = [
        LOCKSTEP, "train", "--nproc", "2", "--config", "llama3_debug", "--job.dump_folder", str(tmp_path / "run"),
        "--model.flavor", "tiny", "--training.steps", "4", "--training.local_batch_size", "2",
        "--training.seq_len", "32", "--training.device", "cpu", "--metrics.log_freq", "2", "--debug.seed", "7",
        "--debug.fingerprint", "--checkpoint.enable", "--checkpoint.interval", "2",
        "--job.custom_config_module", "tests.assets.faulty_rank",
    ]  # fmt: skip
    environment = os.environ | {"OMP_NUM_THREADS": "1", "LOCKSTEP_TEST_FAULT": "1:4"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = read_metrics(tmp_path / "run")[-1]  # the step metrics pool both ranks
    assert last["max_rank_step_time_s"] >= last["min_rank_step_time_s"] > 0 and last["slowest_rank"] in (0, 1)
    assert last["memory/peak_gib_max"] >= last["memory/peak_gib_min"] > 0

    untrusted = subprocess.run(
        [LOCKSTEP, "replay", str(tmp_path / "run"), "--step", "4"], capture_output=True, text=True, timeout=300
    )
    assert untrusted.returncode == 2 and "never imports code by itself" in untrusted.stderr, untrusted.stderr[-3000:]
    monkeypatch.setenv("LOCKSTEP_CONFIG_MODULES", "tests.assets.faulty_rank")  # the user vouches for it
    faulty = subprocess.run(
        [LOCKSTEP, "replay", str(tmp_path / "run"), "--step", "4"], capture_output=True, text=True, timeout=300
    )
    assert faulty.returncode == 1, faulty.stderr[-3000:]
    assert "first difference: rank 1, the forward output of layers.0.feed_forward" in faulty.stdout
    assert "only rank(s) 1 of 2 computed another forward" in faulty.stdout
