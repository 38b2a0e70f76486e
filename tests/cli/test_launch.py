"""`lockstep train --nproc N` (torchrun underneath): stopping by a signal, worker errors, one "run
folder" line, MFU over every device of the run; `lockstep --help` and `--version`."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lockstep.cli import main
from lockstep.run.folder import read_metrics
from lockstep.train.observe.throughput import peak_cache_key
from tests.helpers import tiny_overrides

LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")


def _one_thread() -> dict[str, str]:
    """The environment at call time (conftest points LOCKSTEP_CACHE at the session's cache)."""
    return os.environ | {"OMP_NUM_THREADS": "1"}


def _nproc(folder, *extra: str, nproc: str = "2") -> list[str]:
    return [LOCKSTEP, "train", "--nproc", nproc, "--config", "llama3_debug", *tiny_overrides(folder), *extra]


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _training(tmp_path, *extra: str) -> tuple[subprocess.Popen, list[int]]:
    """`lockstep train --nproc 2` started and held until step 1 is logged (both workers are training);
    the launcher and its two workers."""
    folder = tmp_path / "run"
    command = _nproc(tmp_path, "--training.steps", "100000", *extra)
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_one_thread())
    deadline = time.time() + 120
    while time.time() < deadline and not (folder / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and not (folder / "metrics.jsonl").read_text():
        time.sleep(0.2)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    return launcher, workers


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
def test_sigterm_to_the_launcher_stops_every_rank_after_one_step_and_saves(tmp_path):
    folder = tmp_path / "run"
    launcher, workers = _training(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "100000")
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=90)[0].decode()
    assert launcher.returncode == 75, output[-3000:]
    stopped_at = int(re.search(r"stopped by signal after step (\d+)", output).group(1))
    assert read_metrics(folder)[-1]["step"] == stopped_at
    # The stop checkpoint is a collective save: both ranks wrote their shard at that same step.
    checkpoint = folder / "checkpoint" / f"step-{stopped_at:08d}"
    assert (checkpoint / ".metadata").exists() and len(list(checkpoint.glob("*.distcp"))) == 2
    assert "ChildFailedError" not in output
    deadline = time.time() + 10  # the launcher waited for them; allow init a moment to reap
    while time.time() < deadline and any(map(_alive, workers)):
        time.sleep(0.1)
    assert not any(map(_alive, workers))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
def test_workers_die_with_a_launcher_killed_by_sigkill(tmp_path):
    """SIGKILL gives the launcher no chance to forward anything: the kernel sends each worker the SIGTERM
    it asked for as its parent-death signal, and they stop instead of training on under PID 1."""
    launcher, workers = _training(tmp_path)
    launcher.kill()
    launcher.communicate(timeout=30)
    deadline = time.time() + 90  # they finish their step and leave; reaped by init
    while time.time() < deadline and any(map(_alive, workers)):
        time.sleep(0.2)
    assert not any(map(_alive, workers))


def test_a_bad_input_on_the_workers_is_one_line_and_exit_2(tmp_path):
    """The dataset file is only opened by the trainer, on every rank: one line comes back, once."""
    missing = tmp_path / "missing.txt"
    extra = ("--training.dataset", "text", "--training.dataset_path", str(missing))
    done = subprocess.run(_nproc(tmp_path, *extra), capture_output=True, text=True, env=_one_thread(), timeout=120)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("lockstep train: error: rank "), done.stderr
    assert str(missing) in errors[0]
    assert "ChildFailedError" not in done.stderr + done.stdout and "Traceback" not in done.stderr


@pytest.mark.parametrize("nproc", ["0", "-1"])
def test_nproc_below_one_is_refused(tmp_path, nproc):
    done = subprocess.run(_nproc(tmp_path, nproc=nproc), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"lockstep train: error: argument --nproc: {nproc} must be in 1 .. 1024 (lockstep train --help lists the options)"
    )


def test_two_ranks_print_the_run_folder_once_and_mfu_counts_both_devices(tmp_path, lockstep_cache):
    peak = 1.0e10  # a known per-device peak for one thread, instead of a measured one
    cache = lockstep_cache / "peak_flops.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    cache.write_text(json.dumps(cached | {peak_cache_key(1): peak}))
    done = subprocess.run(
        _nproc(tmp_path, "--training.steps", "2"), capture_output=True, text=True, env=_one_thread(), timeout=120
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1
    assert f"run folder: {(tmp_path / 'run').resolve()}" in done.stdout.splitlines()
    for record in read_metrics(tmp_path / "run"):
        assert record["mfu"] == pytest.approx(100 * record["tflops"] * 1e12 / (2 * peak), rel=1e-12)


def test_help_lists_every_command_and_version_prints_one_line(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    for command in ("train", "convert", "compare", "bisect", "audit", "config-reference"):
        assert f"\n  {command} " in usage
    assert "75 stopped by a signal" in usage
    assert main(["--version"]) == 0
    assert re.fullmatch(r"lockstep \S+\n", capsys.readouterr().out)
    assert main([]) == 2  # no command: the usage, on stderr
    assert "usage: lockstep COMMAND" in capsys.readouterr().err
