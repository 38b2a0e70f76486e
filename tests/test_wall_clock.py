"""wall_s: seconds since the command started, in every metrics record beside elapsed_s."""

import os
import subprocess
import sys
import time

import psutil
import pytest

from lockstep import wall_clock
from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.helpers import tiny_config


def test_every_record_has_wall_s_at_least_elapsed_s_and_growing(tmp_path):
    with Trainer(tiny_config(tmp_path, "--training.steps", "4"), show_progress=False) as trainer:
        trainer.train()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["wall_s"] >= r["elapsed_s"] > 0 for r in records)
    walls = [r["wall_s"] for r in records]
    assert walls == sorted(walls) and walls[-1] > walls[0]


def test_wall_s_counts_from_the_process_start_not_from_an_import():
    """A process that sleeps before importing lockstep has its sleep counted; psutil's start time agrees
    (to its one-second resolution of the boot time)."""
    code = "import time; time.sleep(1.0); from lockstep.wall_clock import wall_s; print(wall_s())"
    env = {k: v for k, v in os.environ.items() if k != wall_clock.STARTED_ENV}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert 1.0 <= float(done.stdout) < 30
    age = psutil.Process().create_time()
    assert abs(wall_clock.wall_s() - (time.time() - age)) < 1.5


@pytest.mark.parametrize("from_parent", [True, False])
def test_a_worker_counts_from_its_launchers_start_only(monkeypatch, from_parent):
    parent = os.getppid() if from_parent else os.getppid() + 1
    monkeypatch.setenv(wall_clock.STARTED_ENV, f"{parent}:12.5")
    wall_clock.started.cache_clear()
    try:
        assert (wall_clock.started() == 12.5) is from_parent
    finally:
        monkeypatch.delenv(wall_clock.STARTED_ENV)
        wall_clock.started.cache_clear()
    assert wall_clock.for_workers() == {wall_clock.STARTED_ENV: f"{os.getpid()}:{wall_clock.started()!r}"}
