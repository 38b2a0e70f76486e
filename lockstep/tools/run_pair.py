"""Launch the runs that `lockstep compare --run` compares: two configs, or one config at two git
revisions (each checked out with ``git worktree``), both started from one seed checkpoint with the
deterministic flags and fingerprints forced on (as torchtitan's loss_compare script does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lockstep.errors import LockstepError


class SideFailed(RuntimeError):
    """One side's launch failed: a failure of that run (exit 1), named with its log, not a bad input."""


FORCED = ["--debug.deterministic", "--debug.fingerprint", "--metrics.log_freq", "1"]


def _train_command(nproc: int) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable]


def _run(command: list[str], cwd: Path | None, log: Path) -> None:
    env = os.environ | ({"PYTHONPATH": str(cwd)} if cwd else {})
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SideFailed(f"{' '.join(command[-2:])} ... failed (exit {done.returncode}); its output is in {log}")


def check_revisions(revisions: list[str]) -> None:
    """Every revision names a commit of the repository containing the current directory: LockstepError in
    one line otherwise, before anything is checked out or launched."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode:
        raise LockstepError("--rev: the current directory is not in a git repository; run from your checkout")
    for revision in revisions:
        found = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}^{{commit}}"],
            capture_output=True, text=True,
        )  # fmt: skip
        if found.returncode:
            raise LockstepError(f"--rev {revision!r}: no such commit in {top.stdout.strip()} (git log lists them)")


def worktree(revision: str, where: Path) -> Path:
    """A detached checkout of `revision` of the repository containing the current directory."""
    if where.exists():
        raise LockstepError(f"{where}: exists already (from an earlier --run?); pass another --out or remove it")
    done = subprocess.run(["git", "worktree", "add", "--detach", str(where), revision], capture_output=True, text=True)
    if done.returncode:
        raise LockstepError(f"--rev {revision!r}: git worktree add failed: {done.stderr.strip().splitlines()[-1]}")
    return where


def launch_pair(
    configs: list[str], revisions: list[str], overrides: list[str], out_dir: Path, seed: int, nproc: int
) -> list[Path]:
    """Run both sides; returns their run folders. Exactly one of configs/revisions has two entries."""
    check_revisions(revisions)
    out_dir.mkdir(parents=True, exist_ok=True)
    sides = [(config, None) for config in configs] if len(configs) == 2 else []
    try:
        for i, revision in enumerate(revisions):  # one at a time, so a failed second removes the first
            sides.append((configs[0], worktree(revision, out_dir / f"worktree-{i}")))
        return _launch(sides, overrides, out_dir, seed, nproc)
    finally:
        for _, tree in sides:
            if tree is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], capture_output=True)


def _launch(sides: list[tuple[str, Path | None]], overrides: list[str], out_dir: Path, seed: int, nproc: int):
    common = ["--debug.seed", str(seed), *FORCED, *overrides]
    seed_folder = out_dir / "seed"
    first_config, first_tree = sides[0]
    seed_args = ["--config", first_config, "--job.dump_folder", str(seed_folder), "--debug.seed", str(seed)]
    seed_args += ["--checkpoint.create_seed_checkpoint", *overrides]
    # Written in the runs' own layout, so a model that fits one device only sharded gets a seed too.
    _run([*_train_command(nproc), "-m", "lockstep.train", *seed_args], first_tree, out_dir / "seed.log")
    folders = []
    for i, (config, tree) in enumerate(sides):
        folder = out_dir / f"run-{i}"
        args = ["--config", config, "--job.dump_folder", str(folder)]
        args += ["--checkpoint.initial_load_path", str(seed_folder), *common]
        _run([*_train_command(nproc), "-m", "lockstep.train", *args], tree, out_dir / f"run-{i}.log")
        folders.append(folder)
    return folders
