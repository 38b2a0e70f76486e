"""Launch the runs that `lockstep compare --run` compares: two configs, or one config at two git
revisions (each checked out with ``git worktree``), both started from one seed checkpoint with the
deterministic flags and fingerprints forced on (as torchtitan's loss_compare script does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")


def worktree(revision: str, where: Path) -> Path:
    """A detached checkout of `revision` of the repository containing the current directory."""
    subprocess.run(["git", "worktree", "add", "--detach", str(where), revision], check=True, capture_output=True)
    return where


def launch_pair(
    configs: list[str], revisions: list[str], overrides: list[str], out_dir: Path, seed: int, nproc: int
) -> list[Path]:
    """Run both sides; returns their run folders. Exactly one of configs/revisions has two entries."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sides = [(config, None) for config in configs] if len(configs) == 2 else []
    if revisions:
        sides = [(configs[0], worktree(rev, out_dir / f"worktree-{i}")) for i, rev in enumerate(revisions)]
    try:
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
