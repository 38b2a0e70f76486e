"""One run per run folder: a second run is refused before any work, naming the holder; a lock whose
holder died is taken over with a note; an unusable dump_folder is refused in one line."""

import os
import subprocess
import sys

import pytest

from lockstep.cli import main
from lockstep.run.lock import LOCK_FILE, RunFolderBusy, RunLock
from tests.helpers import tiny_overrides

HOLD = """
import sys, time
from pathlib import Path
from lockstep.run.lock import RunLock
RunLock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def snapshot(folder) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("launcher", [["lockstep.train"], ["lockstep", "train", "--nproc", "2"]])
def test_second_run_is_refused_and_changes_nothing(tmp_path, launcher):
    """Also under --nproc: the launcher checks the lock before it starts any process."""
    run = tmp_path / "run"
    leftover = run / "checkpoint" / "step-00000004.partial"  # a live run's save in flight: not pruned
    leftover.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    lock = RunLock.acquire(run)
    try:
        before = snapshot(run)
        command = [sys.executable, "-m", *launcher, "--config", "llama3_debug", *tiny_overrides(tmp_path)]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"}
        )
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lockstep train: error:"), done.stderr
        assert "in use by another run" in lines[0] and f"pid {os.getpid()}" in lines[0]
        assert snapshot(run) == before
    finally:
        lock.release()
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly: nothing for the next run to take over


def test_lock_of_a_dead_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid} on host"):
            RunLock.acquire(run)
    finally:
        holder.kill()  # like kill -9: the OS drops its lock, its record stays in the file
        holder.wait()
        holder.stdout.close()
    notes: list[str] = []
    lock = RunLock.acquire(run, notes.append)
    assert len(notes) == 1 and "taking over" in notes[0] and f"pid {holder.pid}" in notes[0]
    assert f'"pid": {os.getpid()}' in (run / LOCK_FILE).read_text()
    lock.release()


def test_dump_folder_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert main(["train", "--config", "llama3_debug", *tiny_overrides(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is a file, not a folder" in error[0] and str(tmp_path / "run") in error[0]
    assert (tmp_path / "run").read_text() == "not a folder"
