"""The resume policy: a resumed run trains at what its config says, and keeps its seed.

On resume the config is compared with the one recorded in the checkpoint's manifest (the previous
launch's config.toml for checkpoints older than that record). Settings that change the numbers
(model, data, tokenizer, optimizer, schedule, batch, seed...) may not change silently: the resume is
refused, naming only the changed keys, unless checkpoint.allow_config_change, and then the new values
take effect (the lr schedule is recomputed at the resumed step, the optimizer's hyperparameters are
reset to the config's). training.steps and the parallel layout may change; they are recorded.

A config without debug.seed resumes with the seed of the run it resumes (``resumed_seed``), which
would otherwise draw a new one, and with it a new data order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib

from lockstep.checkpoint import folders
from lockstep.checkpoint.manager import UNSET, describe_differences, differences, flatten
from lockstep.config.sections import CheckpointConfig
from lockstep.errors import LockstepError
from lockstep.run.launches import previous_launch_config, read_record

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


def changes_the_numbers(key: str) -> bool:
    return key not in RECORDED_KEYS and (key.split(".")[0] in NUMERIC_SECTIONS or key in NUMERIC_KEYS)


def shared_settings(identity: dict) -> dict:
    """What every replica group of a fault-tolerant run must run alike, from a checkpoint identity: the
    model, data and layout, and the settings that change the numbers (the step count too: it sets the
    lr schedule)."""
    config = {k: v for k, v in flatten(identity["config"]).items() if changes_the_numbers(k) or k == "training.steps"}
    return {"model": identity["model"], "data": identity["fingerprints"], "layout": identity["layout"]} | config


def resumed_config(manifest: dict, run_folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The config that trained the checkpoint about to be resumed, and where it was read from."""
    if isinstance(manifest.get("config"), dict):
        return manifest["config"], "the checkpoint's manifest"
    previous = previous_launch_config(run_folder)
    if previous is not None and previous.get("training", {}).get("global_batch_size") == -1:
        del previous["training"]["global_batch_size"]  # resolved in a layout not recorded there
    return previous, "the previous launch's config.toml"


def check_config_change(
    previous: dict[str, Any] | None, current: dict[str, Any], *, allow: bool, checkpoint: Path, source: str, log
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


def resumed_seed(checkpoint: CheckpointConfig, run_folder: Path) -> int | None:
    """The root seed of the run to be resumed (None when there is no checkpoint to resume): a config
    without debug.seed would otherwise draw a new one, and with it a new data order."""
    if not checkpoint.enable:
        return None
    steps = folders.published_steps(run_folder / checkpoint.folder)
    for _, folder in reversed(steps):
        seed = (read_record(folder / folders.MANIFEST) or {}).get("config", {}).get("debug", {}).get("seed")
        if seed is not None:
            return int(seed)
    if steps:
        seed = (previous_launch_config(run_folder) or {}).get("debug", {}).get("seed")
        return None if seed is None else int(seed)
    return None
