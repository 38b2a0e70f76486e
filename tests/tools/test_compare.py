"""lockstep compare: tables, first differing step, plots, exit codes; --run launches the runs."""

import json
import math
import os
import subprocess
import sys

from lockstep.config import dump_toml
from tests.helpers import tiny_config

LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")


def _losses(path, values):
    path.write_text(
        "".join(json.dumps({"step": i + 1, "loss": v, "grad_norm": 1.0}) + "\n" for i, v in enumerate(values))
    )
    return path


def _compare(*args):
    return subprocess.run([LOCKSTEP, "compare", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_one_ulp_is_found_at_its_step(tmp_path):
    values = [8.0 - 0.1 * i for i in range(10)]
    changed = values.copy()
    changed[6] = math.nextafter(changed[6], math.inf)  # one ULP (of a double) at step 7
    a, b = _losses(tmp_path / "a.jsonl", values), _losses(tmp_path / "b.jsonl", changed)
    done = _compare(a, b, "--assert-equal", "--plot", tmp_path / "plot.png")
    assert done.returncode == 1
    assert "first differing step (bitwise): 7" in done.stdout
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert _compare(a, b, "--rtol", "1e-9").returncode == 0
    assert _compare(a, a, "--assert-equal").returncode == 0


def test_run_launches_two_configs_from_one_seed_checkpoint(tmp_path):
    """Full activation checkpointing recomputes the same ops: bitwise equal to no AC."""
    configs = []
    for name, extra in (("plain", []), ("ac", ["--activation_checkpoint.mode", "full"])):
        path = tmp_path / f"{name}.toml"
        path.write_text(dump_toml(tiny_config(tmp_path, *extra)))
        configs += ["--config", path]
    done = _compare("--run", *configs, "--out", tmp_path / "out", "--assert-equal")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no difference (bitwise)" in done.stdout
    assert "match" in done.stdout  # fingerprints were forced on and agree
    assert (tmp_path / "out" / "compare.png").exists()


def test_run_compares_two_git_revisions(tmp_path):
    """The same revision twice (HEAD): checked out with git worktree, bitwise equal."""
    config = tmp_path / "tiny.toml"
    config.write_text(dump_toml(tiny_config(tmp_path)))
    done = _compare(
        "--run", "--config", config, "--rev", "HEAD", "--rev", "HEAD", "--out", tmp_path / "out", "--assert-equal"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no difference (bitwise)" in done.stdout
    assert not (tmp_path / "out" / "worktree-0").exists()  # worktrees are removed afterwards
