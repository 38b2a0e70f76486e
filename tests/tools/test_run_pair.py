"""lockstep compare --run (lockstep.tools.run_pair): two configs, or one config at two git revisions,
launched from one seed checkpoint and compared."""

import os
import subprocess
import sys
from pathlib import Path

from lockstep.cli import main
from lockstep.config import dump_toml
from tests.helpers import tiny_config

LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")


def _compare(*args):
    return subprocess.run([LOCKSTEP, "compare", *map(str, args)], capture_output=True, text=True, timeout=300)


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


def test_run_writes_the_seed_checkpoint_in_the_runs_layout(tmp_path, monkeypatch):
    """With --nproc 2 the seed checkpoint is written by torchrun too, so a model that fits one device
    only sharded gets one (the launches are recorded, not run)."""
    from lockstep.tools import run_pair

    launched = []
    monkeypatch.setattr(run_pair, "_run", lambda command, cwd, log: launched.append(command))
    run_pair.launch_pair(["a.toml", "b.toml"], [], [], tmp_path, seed=0, nproc=2)
    assert len(launched) == 3
    assert all(c[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] for c in launched)
    assert "--checkpoint.create_seed_checkpoint" in launched[0]


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


def test_a_revision_that_names_no_commit_is_one_line_before_anything_is_checked_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the checkout
    argv = ["compare", "--run", "--config", "llama3_debug", "--rev", "HEAD", "--rev", "no-such-rev"]
    code = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "--rev 'no-such-rev': no such commit" in err, err
    assert not (tmp_path / "out").exists()
    monkeypatch.chdir(tmp_path)  # outside any repository
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "not in a git repository" in capsys.readouterr().err
