"""Initial weights from checkpoint.initial_load_path: a lockstep checkpoint (or a run folder holding
one), or a Hugging Face folder (safetensors only), loaded into whatever layout this run has; a
lockstep checkpoint is verified and read through the pickle allow-list, like a resume. Either way each
rank reads only its own shards, so no rank ever holds the full model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointError
from lockstep.checkpoint.hf import check_hf_config, is_hf_folder, load_hf_weights, resolve_checkpoint_folder
from lockstep.checkpoint.manager import CheckpointManager, CheckpointMismatch
from lockstep.checkpoint.manifest import recorded_args
from lockstep.checkpoint.states import persistent_tensors
from lockstep.models.registry import ModelSpec


def load_initial_weights(
    path: Path, checkpointer: CheckpointManager, states: dict, spec: ModelSpec, args, parts: list[nn.Module]
) -> None:
    if not path.exists():
        raise CheckpointError(
            path, "checkpoint.initial_load_path does not exist", "give an existing checkpoint or HF folder"
        )
    if is_hf_folder(path):
        check_hf_config(path, spec, args)
        # Straight into this rank's shards (DTensors or, unsharded, whole tensors): no full model here.
        load_hf_weights(path, spec, args, {n: t for part in parts for n, t in persistent_tensors(part).items()})
        checkpointer.log(f"initial weights from Hugging Face folder {path}")
        return
    folder = resolve_checkpoint_folder(path, check=checkpointer.problem_with)  # verified, split over ranks
    ours = json.loads(json.dumps(dataclasses.asdict(args)))
    recorded = recorded_args(folders.read_manifest(folder), ours)
    if recorded != ours and not checkpointer.config.ignore_mismatch:
        changed = sorted(k for k in ours if recorded.get(k) != ours[k])
        raise CheckpointMismatch(
            f"initial weights {folder} have other model args ({', '.join(changed)}); "
            "pass --checkpoint.ignore_mismatch to load them anyway"
        )
    checkpointer.load(folder, states, parts=("model",))
