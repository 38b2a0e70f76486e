"""The run folder, the contract that the tools (compare, bisect) read:
config.toml (resolved; ``--config`` on it reproduces the run), env.json (versions, git revision,
host, device, seeds, data fingerprints) and metrics.jsonl (one JSON object per logged step).

config.toml and env.json are the latest launch's; every launch (first, resumed, rerun) keeps its own
copies and step range under launches/NNN (lockstep.run.launches). ``.lock`` names the run that
holds the folder (lockstep.run.lock)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lockstep.data.cache import atomic_path
from lockstep.errors import InputError
from lockstep.run.jsonl import json_floats, keep_numbered, rewind
from lockstep.untrusted import parse_json

PACKAGES = ("lockstep", "torch", "numpy", "tokenizers", "datasets", "safetensors", "rich", "tensorboard")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> dict[str, Any]:
    """The revision of the lockstep source tree in use (None outside a git checkout)."""
    source = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"revision": None, "dirty": None}


def environment(
    device: torch.device, world_size: int, seeds: dict, fingerprints: dict[str, str], layout: dict | None = None
) -> dict:
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "lockstep_version": _version("lockstep"),
        "git": git_revision(),
        "versions": {p: _version(p) for p in PACKAGES} | {"python": platform.python_version()},
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": {"type": device.type, "name": device_name, "cuda": torch.version.cuda},
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "layout": layout or {},
        "seeds": seeds,
        "fingerprints": fingerprints,
        "command": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def environment_differences(recorded: dict) -> list[str]:
    """How this machine's software differs from a run's env.json (package versions, git revision, host):
    what a replay that disagrees with the run should be read against."""
    found = []
    versions = {p: _version(p) for p in PACKAGES} | {"python": platform.python_version()}
    for package, version in versions.items():
        theirs = recorded.get("versions", {}).get(package)
        if theirs is not None and theirs != version:
            found.append(f"{package} {theirs} in the run, {version} here")
    theirs, here = recorded.get("git", {}), git_revision()
    if theirs.get("revision") != here.get("revision"):
        found.append(
            f"lockstep git revision {str(theirs.get('revision'))[:12]}{' (dirty)' if theirs.get('dirty') else ''} "
            f"in the run, {str(here.get('revision'))[:12]}{' (dirty)' if here.get('dirty') else ''} here"
        )
    if recorded.get("host") not in (None, socket.gethostname()):
        found.append(f"host {recorded['host']} in the run, {socket.gethostname()} here")
    return found


def write_replacing(path: Path, text: str) -> None:
    """Write a run-folder file by renaming a new file over it: a link left there is replaced, never
    written through (a run must not change a file outside its folder)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def plain_or_absent(path: Path) -> None:
    """Refuse, in one line, a run-folder file that lockstep appends to or reads back but that is a link,
    a folder or a FIFO (appending would write outside the run; reading a FIFO would never end)."""
    if os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
        raise InputError(path, "is not a plain file (a link, a folder or a FIFO)", "move it out of the run folder")


def prepare_run_folder(folder: Path, config_toml: str, env: dict, resumed_at: int | None = None) -> Path:
    """Write config.toml and env.json (the latest launch's: launches/ keeps every launch's, so start_launch
    runs first), and return the metrics.jsonl path. A fresh run keeps an earlier
    run's metrics.jsonl under a numbered name; a run resumed from step k appends to it, after moving
    any records past step k (steps that are about to be recomputed) to metrics.rewound.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    write_replacing(folder / "config.toml", config_toml)
    write_replacing(folder / "env.json", json.dumps(env, indent=2) + "\n")
    metrics = folder / "metrics.jsonl"
    for path in (metrics, folder / "metrics.rewound.jsonl"):
        plain_or_absent(path)
    if not metrics.exists():
        return metrics
    if resumed_at is None:
        keep_numbered(metrics)  # metrics.N.jsonl
    else:
        rewind(metrics, resumed_at, folder / "metrics.rewound.jsonl")  # torn lines too: kept aside
    return metrics


def read_metrics(folder: Path) -> list[dict]:
    """Every logged step of a run folder, in order, non-finite values as floats again (written as
    "NaN"/"Infinity"/"-Infinity" strings; older files' bare NaN tokens are read too)."""
    path = Path(folder) / "metrics.jsonl"
    with open(path, "rb") as f:
        records = []
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json_floats(parse_json(line, allow_nan=True)))
                except ValueError as error:
                    raise InputError(
                        path, str(error), "it is written by lockstep train", where=f"line {number}"
                    ) from None
        return records
