"""A rank that hangs makes every rank exit within comm.train_timeout_seconds, with one line naming the
collective and the step, and a flight-recorder record of what each rank was doing."""

import json
import os
import subprocess
import sys
import time

from tests.helpers import tiny_overrides

LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")
TIMEOUT_S = 3


def test_a_stalled_rank_ends_the_run_within_the_train_timeout(tmp_path):
    command = [LOCKSTEP, "train", "--nproc", "2", "--config", "llama3_debug", *tiny_overrides(tmp_path)]
    command += ["--comm.train_timeout_seconds", str(TIMEOUT_S)]
    environment = os.environ | {"OMP_NUM_THREADS": "1", "LOCKSTEP_STALL": "1:3"}  # rank 1 hangs at step 3
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
    ended = time.time()
    run = tmp_path / "run"
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("lockstep train: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"timed out after {TIMEOUT_S} s at step 3" in errors[0]
    assert "rank 0: collective gloo:" in errors[0] and "comm.train_timeout_seconds" in errors[0]
    # The last record (step 2) was written before rank 1 stalled; everything ended within the timeout
    # plus the teardown (torchrun stops the hung rank once rank 0 has exited).
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert ended - (run / "metrics.jsonl").stat().st_mtime < TIMEOUT_S + 10
    (record,) = (run / "comm_traces").iterdir()
    entries = json.loads(record.read_text())["entries"]
    assert (
        entries
        and errors[0].split("collective ")[1].split(" ")[0]
        == max(entries, key=lambda e: e["record_id"])["profiling_name"]
    )


def test_a_rank_killed_by_sigkill_ends_the_run_in_one_line_per_survivor(tmp_path):
    """Rank 1 SIGKILLs itself at step 3: rank 0's collective fails at once (its peer's connection closed),
    and the user sees one error line from rank 0 and the launcher's line naming rank 1, no traceback."""
    command = [LOCKSTEP, "train", "--nproc", "2", "--config", "llama3_debug", *tiny_overrides(tmp_path)]
    environment = os.environ | {"OMP_NUM_THREADS": "1", "LOCKSTEP_DIE": "1:3"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output[-3000:]
    [error] = [line for line in done.stderr.splitlines() if line.startswith("lockstep train: error:")]
    assert error.startswith("lockstep train: error: rank 0: collective gloo:") and "at step 3: a peer is gone" in error
    assert "lockstep train: rank 1 failed (signal SIGKILL)" in output
