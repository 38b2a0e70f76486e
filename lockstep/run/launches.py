"""Every launch of a run keeps its own record, and a resumed run trains at what its config says.

A run folder can be launched many times: a fresh start, resumes after a stop or a crash, reruns with
more steps or on more ranks. Each launch gets ``launches/NNN/`` with its resolved ``config.toml``, its
``env.json`` and ``launch.json`` (start step, the checkpoint resumed, the keys changed since the
previous launch, and the end step once it finishes or stops). The top-level config.toml and env.json
stay the latest launch's copies, for the tools that read them.

On resume the config is compared with the one recorded in the checkpoint's manifest (the previous
launch's config.toml for checkpoints older than that record). Settings that change the numbers
(model, data, tokenizer, optimizer, schedule, batch, seed...) may not change silently: the resume is
refused, naming only the changed keys, unless checkpoint.allow_config_change, and then the new values
take effect (the lr schedule is recomputed at the resumed step, the optimizer's hyperparameters are
reset to the config's). training.steps and the parallel layout may change; they are recorded.
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
import torch

from lockstep.checkpoint import folders
from lockstep.checkpoint.manager import UNSET, describe_differences, differences, flatten
from lockstep.config.sections import CheckpointConfig, MetricsConfig
from lockstep.errors import InputError, LockstepError
from lockstep.run.folder import prepare_run_folder, write_replacing
from lockstep.run.metrics_file import MetricsLogger
from lockstep.untrusted import load_toml, parse_json

LAUNCHES = "launches"
RECORD = "launch.json"

NUMERIC_SECTIONS = ("model", "data", "training", "optimizer", "lr_scheduler")
"""Sections whose every key changes the numbers, apart from RECORDED_KEYS."""
NUMERIC_KEYS = (
    "debug.seed", "debug.layout_invariant_reductions", "debug.moe_force_load_balance", "debug.deterministic_chunks",
)  # fmt: skip
"""Keys of other sections that change the numbers."""
RECORDED_KEYS = (
    "training.steps",  # the schedule follows the new total
    "training.device",  # like the layout: where the run computes (env.json records the device)
    "model.attention",  # the kernel, like the device: env.json records the one auto resolved to
    "training.dataset_path",  # where the data is; its content is checked by the dataset fingerprint
    "data.mixture",  # where its folders are; their content and weights are in the dataset fingerprint
    "model.tokenizer_path",  # likewise, checked by the tokenizer fingerprint
    "data.cache_folder",
)
"""Keys of NUMERIC_SECTIONS that may change on resume (recorded, not refused)."""


class ConfigChangeError(LockstepError):
    """A resume with settings that change the numbers, without checkpoint.allow_config_change."""


def config_record(config_toml: str, global_batch: int | None = None) -> dict[str, Any]:
    """The resolved config (``dump_toml`` text) as plain data, as config.toml holds it (the form both
    sides of a comparison take, whether read from a manifest or from a launch's config.toml); with
    `global_batch`, the batch as resolved, since global_batch_size = -1 means a different batch in
    another layout."""
    record = tomllib.loads(config_toml)
    if global_batch is not None:
        record["training"]["global_batch_size"] = global_batch
    return record


def config_for_step(run_folder: Path, step: int) -> Path:
    """The config.toml of the launch that trained `step` (the newest launch that started before it),
    for tools that recompute a step; the top-level config.toml when no launch records say otherwise."""
    for _, folder in reversed(launch_folders(run_folder)):
        start = (_read_json(folder / RECORD) or {}).get("start_step")
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


def changes_the_numbers(key: str) -> bool:
    return key not in RECORDED_KEYS and (key.split(".")[0] in NUMERIC_SECTIONS or key in NUMERIC_KEYS)


def shared_settings(identity: dict) -> dict:
    """What every replica group of a fault-tolerant run must run alike, from a checkpoint identity: the
    model, data and layout, and the settings that change the numbers (the step count too: it sets the
    lr schedule)."""
    config = {k: v for k, v in flatten(identity["config"]).items() if changes_the_numbers(k) or k == "training.steps"}
    return {"model": identity["model"], "data": identity["fingerprints"], "layout": identity["layout"]} | config


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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        record = parse_json(path.read_bytes(), allow_nan=True)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def previous_launch_config(run_folder: Path) -> dict[str, Any] | None:
    """The config of the latest launch (a run folder from before launches/ has only config.toml)."""
    launches = launch_folders(run_folder)
    return _read_toml((launches[-1][1] if launches else run_folder) / "config.toml")


def resumed_config(manifest: dict, run_folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The config that trained the checkpoint about to be resumed, and where it was read from."""
    if isinstance(manifest.get("config"), dict):
        return manifest["config"], "the checkpoint's manifest"
    previous = previous_launch_config(run_folder)
    if previous is not None and previous.get("training", {}).get("global_batch_size") == -1:
        del previous["training"]["global_batch_size"]  # resolved in a layout not recorded there
    return previous, "the previous launch's config.toml"


def check_config_change(
    previous: dict[str, Any] | None, current: dict[str, Any], allow: bool, checkpoint: Path, source: str, log
) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume `checkpoint` with settings that change the numbers, naming only the changed
    keys (old -> new), unless `allow`; returns those changes (empty when none or nothing to compare)."""
    if previous is None:
        return {}
    # A key on one side only (added to or dropped from lockstep since) is not a change of the run's numbers.
    changed = {
        k: (a, b)
        for k, (a, b) in differences(previous, current).items()
        if changes_the_numbers(k) and UNSET not in (a, b)
    }
    if changed and not allow:
        raise ConfigChangeError(
            f"resuming {checkpoint} with settings that change the numbers ({describe_differences(changed)}; "
            f"old from {source}); pass --checkpoint.allow_config_change to train on with the new values "
            "(recorded in launches/), restore the old values, or use another --job.dump_folder"
        )
    if changed:
        log(
            f"warning: resuming with changed settings (checkpoint.allow_config_change): {describe_differences(changed)}"
        )
    return changed


def optimizer_hyperparameters(optimizers: list[torch.optim.Optimizer]) -> list[list[dict[str, Any]]]:
    """Every param group's settings but its parameters, as built from the config (taken before a
    resume loads the checkpoint's param groups over them)."""
    return [[{k: v for k, v in group.items() if k != "params"} for group in o.param_groups] for o in optimizers]


def reset_optimizer_hyperparameters(
    optimizers: list[torch.optim.Optimizer], from_config: list[list[dict[str, Any]]]
) -> None:
    """After a resume, set every param-group setting the checkpoint carried (lr, betas, eps,
    weight_decay, the implementation: foreach/fused...) back to what the config built
    (`optimizer_hyperparameters` before the load); the lr itself is then set by the schedule
    (SchedulerState.apply). Unchanged values are rewritten as the same numbers."""
    for each, groups in zip(optimizers, from_config, strict=True):
        for group, settings in zip(each.param_groups, groups, strict=True):
            group.update(settings | {"initial_lr": settings.get("initial_lr", settings["lr"])})


def resumed_seed(checkpoint: CheckpointConfig, run_folder: Path) -> int | None:
    """The root seed of the run to be resumed (None when there is no checkpoint to resume): a config
    without debug.seed would otherwise draw a new one, and with it a new data order."""
    if not checkpoint.enable:
        return None
    steps = folders.published_steps(run_folder / checkpoint.folder)
    for _, folder in reversed(steps):
        seed = (_read_json(folder / folders.MANIFEST) or {}).get("config", {}).get("debug", {}).get("seed")
        if seed is not None:
            return int(seed)
    if steps:
        seed = (previous_launch_config(run_folder) or {}).get("debug", {}).get("seed")
        return None if seed is None else int(seed)
    return None


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
        changed |= differences(_layout(_read_json(previous / "env.json")), _layout(env))
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


def record_launch(
    run_folder: Path,
    config_toml: str,
    env: dict[str, Any],
    start_step: int,
    resumed_from: Path | None,
    resumed_at: int | None,
    metrics: MetricsConfig,
    log,
) -> tuple[Launch, MetricsLogger]:
    """Rank 0's writes at the start of a launch: launches/NNN, the latest config.toml and env.json,
    and the metrics sinks. An odd file where one of these belongs is one line naming it."""
    try:
        launch = start_launch(run_folder, config_toml, env, start_step, resumed_from, log)
        metrics_file = prepare_run_folder(run_folder, config_toml, env, resumed_at=resumed_at)
        return launch, MetricsLogger(
            metrics, run_folder=run_folder, metrics_file=metrics_file, run_name=run_folder.name
        )
    except OSError as e:  # e.g. a file where launches/NNN or metrics.jsonl belongs
        raise InputError(
            e.filename or run_folder, f"cannot record this launch ({e.strerror})",
            "move the file or folder in the way out of the run folder",
        ) from e  # fmt: skip
