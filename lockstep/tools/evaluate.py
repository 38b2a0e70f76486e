"""``lockstep eval``'s library: the held-out loss of a run folder's newest checkpoint, of one checkpoint
step folder, or of a Hugging Face folder, through the same validator as in-loop validation (lockstep.cli.eval runs it in a Trainer).

The evaluation builds the model in the layout of this launch (any, via ``--nproc`` and the
parallelism overrides), loads the weights as ``checkpoint.initial_load_path`` does (each rank reads
only its shards), and runs the validator once. Its own run folder is a scratch folder the caller
owns: nothing is written into the evaluated run.
"""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w

from lockstep.checkpoint import folders
from lockstep.checkpoint.hf import is_hf_folder
from lockstep.config import JobConfig, load_config
from lockstep.config.errors import ConfigError
from lockstep.errors import InputError
from lockstep.train.validation import Evaluation

RUN_CONFIG = "config.toml"


def evaluation_config(path: Path, config_name: str | None, overrides: list[str], scratch: Path) -> JobConfig:
    """The config to evaluate `path` with: the run's own config (a run folder's config.toml, or the
    manifest's record for a step folder), or `config_name` for a Hugging Face folder; then the
    overrides, then what makes it an evaluation (weights from `path`, validation on, no checkpoints,
    `scratch` as the run folder)."""
    if not path.exists():
        raise InputError(path, "does not exist", "give a run folder, a checkpoint step folder or a Hugging Face folder")
    source = _config_source(path, config_name, scratch)
    config = load_config(str(source) if source else None, overrides)
    config.fault_tolerance.enable = False  # a replica group's run is evaluated alone, never in its job
    config.job.dump_folder = str(scratch / "run")
    config.training.global_batch_size = -1  # the training batch plays no part, and must fit this layout
    held_out = bool(config.data.validation_fraction)  # validation documents held out of the training source
    if config.validation.dataset == "" and not held_out:  # the run validated on its training source's split
        if config.training.dataset != "builtin":
            raise ConfigError(
                "validation.dataset",
                f"is required when training.dataset = {config.training.dataset} (only the built-in corpus has a "
                "validation split); pass --validation.dataset and --validation.dataset_path, or "
                "--data.validation_fraction to evaluate on documents held out of the training source",
            )
        config.validation.dataset = "builtin"
    if not held_out:  # the run's training data is never read
        config.training.dataset, config.training.dataset_path = "builtin", ""
    config.data.mixture = []
    config.checkpoint.enable = False
    config.checkpoint.create_seed_checkpoint = False
    config.checkpoint.initial_load_path = str(path)
    config.validation.enable = True
    config.metrics.enable_tensorboard = config.metrics.enable_wandb = False
    return config


def _config_source(path: Path, config_name: str | None, scratch: Path) -> Path | str | None:
    if config_name:
        return config_name
    if (path / RUN_CONFIG).is_file():
        return path / RUN_CONFIG
    if folders.has_manifest(path):
        record = folders.read_manifest(path).get("config")
        if isinstance(record, dict):
            written = scratch / RUN_CONFIG
            written.write_text(tomli_w.dumps(record))
            return written
        for parent in path.parents:  # a format-1 manifest: the run folder above the step folder
            if (parent / RUN_CONFIG).is_file():
                return parent / RUN_CONFIG
    if is_hf_folder(path):
        raise InputError(
            path, "is a Hugging Face folder, which says nothing of tokenizer or flavor",
            "pass --config (e.g. llama3_debug) and, if needed, --model.flavor",
        )  # fmt: skip
    raise InputError(path, "holds no config.toml or checkpoint manifest", "give a run folder or a step-N folder")


def evaluation_json(result: Evaluation, path: Path) -> str:
    return json.dumps({"path": str(path), **result.as_record()})
