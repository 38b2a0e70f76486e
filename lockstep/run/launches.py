"""Every launch of a run keeps its own record.

A run folder can be launched many times: a fresh start, resumes after a stop or a crash, reruns with
more steps or on more ranks. Each launch gets ``launches/NNN/`` with its resolved ``config.toml``, its
``env.json`` and ``launch.json`` (start step, the checkpoint resumed, the keys changed since the
previous launch, and the end step once it finishes or stops). The top-level config.toml and env.json
stay the latest launch's copies, for the tools that read them. What a resume may change is
``lockstep.run.resume``'s.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from lockstep.checkpoint.manager import describe_differences, differences
from lockstep.errors import InputError
from lockstep.run.folder import write_replacing
from lockstep.untrusted import load_toml, parse_json

LAUNCHES = "launches"
RECORD = "launch.json"


def config_for_step(run_folder: Path, step: int) -> Path:
    """The config.toml of the launch that trained `step` (the newest launch that started before it),
    for tools that recompute a step; the top-level config.toml when no launch records say otherwise."""
    for _, folder in reversed(launch_folders(run_folder)):
        start = (read_record(folder / RECORD) or {}).get("start_step")
        if start is not None and start < step and (folder / "config.toml").is_file():
            return folder / "config.toml"
    return run_folder / "config.toml"


def env_for_step(run_folder: Path, step: int) -> dict[str, Any]:
    """The env.json of the launch that trained `step` (its world size, threads and data fingerprint may
    differ from a later launch's), the top-level one without launch records; InputError if unreadable."""
    launch_env = config_for_step(run_folder, step).parent / "env.json"
    path = launch_env if launch_env.is_file() else run_folder / "env.json"
    try:
        record = parse_json(path.read_bytes(), allow_nan=True)
    except (OSError, ValueError) as error:
        raise InputError(
            path, f"is not readable JSON ({error})", "it is written by lockstep train; restore it"
        ) from None
    if not isinstance(record, dict):
        raise InputError(path, "is not a JSON object", "it is written by lockstep train; restore it")
    return record


def launch_folders(run_folder: Path) -> list[tuple[int, Path]]:
    """(number, folder) of every recorded launch, oldest first."""
    root = run_folder / LAUNCHES
    if not root.is_dir():
        return []
    return sorted((int(p.name), p) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _read_toml(path: Path) -> dict[str, Any] | None:
    try:
        return load_toml(path.read_bytes())
    except (OSError, ValueError):
        return None


def read_record(path: Path) -> dict[str, Any] | None:
    """A JSON object file of a run (launch.json, env.json, a checkpoint's manifest); None when it is
    missing, unreadable or not an object."""
    try:
        record = parse_json(path.read_bytes(), allow_nan=True)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def previous_launch_config(run_folder: Path) -> dict[str, Any] | None:
    """The config of the latest launch (a run folder from before launches/ has only config.toml)."""
    launches = launch_folders(run_folder)
    return _read_toml((launches[-1][1] if launches else run_folder) / "config.toml")


@dataclass
class Launch:
    """This launch's record in launches/NNN (written by rank 0)."""

    folder: Path
    record: dict[str, Any]

    def _write(self) -> None:
        tmp = self.folder / f"{RECORD}.tmp"
        tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        tmp.replace(self.folder / RECORD)

    def healed(self, step: int) -> None:
        """Fault tolerance replaced this launch's state by a live replica group's at `step` (a heal)."""
        self.record["healed_at"] = self.record.get("healed_at", []) + [step]
        self._write()

    def finish(self, end_step: int, completed: bool) -> None:
        """Record where this launch ended: training.steps reached, or stopped (signal, error) earlier."""
        self.record |= {
            "end_step": end_step,
            "completed": completed,
            "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self._write()


def _keep_unrecorded_launch(run_folder: Path) -> None:
    """A run folder written before launches/ existed: its config.toml and env.json become launch 1, so
    that the new launch's copies do not replace them."""
    if launch_folders(run_folder) or not (run_folder / "config.toml").is_file():
        return
    first = run_folder / LAUNCHES / f"{1:03d}"
    first.mkdir(parents=True)
    for name in ("config.toml", "env.json"):
        if (run_folder / name).is_file():
            shutil.copy2(run_folder / name, first / name)
    note = "kept from the run folder, written before launches/ were recorded; step range unknown"
    Launch(first, {"launch": 1, "note": note})._write()


def _layout(env: dict[str, Any] | None) -> dict[str, Any]:
    env = env or {}
    return {"world_size": env.get("world_size"), "layout": env.get("layout", {}).get("degrees")}


def start_launch(
    run_folder: Path,
    *,
    config_toml: str,
    env: dict[str, Any],
    start_step: int,
    resumed_from: Path | None,
    log,
) -> Launch:
    """Record a new launch (launches/NNN: config.toml, env.json, launch.json) and log one line naming
    the keys changed since the previous launch, the world size and layout included."""
    _keep_unrecorded_launch(run_folder)
    launches = launch_folders(run_folder)
    number = launches[-1][0] + 1 if launches else 1
    folder = run_folder / LAUNCHES / f"{number:03d}"
    if os.path.lexists(folder.parent) and (folder.parent.is_symlink() or not folder.parent.is_dir()):
        raise InputError(folder.parent, "is not a folder (a file or a link)", "move it out of the run folder")
    folder.mkdir(parents=True)  # the run lock makes the number ours; an existing folder is never reused
    write_replacing(folder / "config.toml", config_toml)
    write_replacing(folder / "env.json", json.dumps(env, indent=2) + "\n")
    changed: dict[str, tuple[Any, Any]] = {}
    if launches:
        previous = launches[-1][1]
        changed = differences(_read_toml(previous / "config.toml") or {}, tomllib.loads(config_toml))
        changed |= differences(_layout(read_record(previous / "env.json")), _layout(env))
    record = {
        "launch": number,
        "started_at": env.get("started_at"),
        "start_step": start_step,
        "resumed_from": str(resumed_from) if resumed_from is not None else None,
        "changed_since_previous_launch": {k: list(v) for k, v in changed.items()},
        "end_step": None,
    }
    launch = Launch(folder, record)
    launch._write()
    how = f"resumed at step {start_step} from {resumed_from}" if resumed_from is not None else "fresh start"
    if not launches:
        log(f"launch {number} ({how})")
    else:
        since = describe_differences(changed) if changed else "nothing"
        log(f"launch {number} ({how}); changed since launch {launches[-1][0]}: {since}")
    return launch
