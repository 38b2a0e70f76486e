"""The start of a run from checkpoint.initial_load_path: a lockstep checkpoint (or a run folder holding
one), a torchtitan checkpoint, or a Hugging Face folder (safetensors only), loaded into whatever layout
this run has; a lockstep checkpoint is verified and read through the pickle allow-list, like a resume.
Either way each rank reads only its own shards, so no rank ever holds the full model.

With checkpoint.initial_load_model_only = false a lockstep or torchtitan checkpoint also gives the
optimizer state, the schedule's step and the train state, and the run goes on from its step (a Hugging
Face folder holds weights only)."""

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
from lockstep.checkpoint.torchtitan import is_torchtitan_checkpoint, load_torchtitan_checkpoint
from lockstep.models.registry import ModelSpec

TRAINING_PARTS = ("model", "optimizer", "lr_scheduler", "train_state")
"""What a start that goes on from another run's step takes from its checkpoint (not its data position: the
run continues in its own data order at that step, nor its RNG state)."""


def load_initial(
    path: Path, *, checkpointer: CheckpointManager, states: dict, spec: ModelSpec, args, parts: list[nn.Module]
) -> int | None:
    """Load checkpoint.initial_load_path into `states`; returns the step training goes on from, or None when
    only the model was taken (checkpoint.initial_load_model_only)."""
    config = checkpointer.config
    model_only = config.initial_load_model_only
    if not path.exists():
        raise CheckpointError(
            path, "checkpoint.initial_load_path does not exist", "give an existing checkpoint or HF folder"
        )
    if is_hf_folder(path):
        if not model_only:
            raise CheckpointError(
                path, "is a Hugging Face folder, which holds weights only",
                "set checkpoint.initial_load_model_only = true, or give a checkpoint with training state",
            )  # fmt: skip
        check_hf_config(path, spec, args)
        # Straight into this rank's shards (DTensors or, unsharded, whole tensors): no full model here.
        load_hf_weights(path, spec, args, {n: t for part in parts for n, t in persistent_tensors(part).items()})
        checkpointer.log(f"initial weights from Hugging Face folder {path}")
        return None
    if is_torchtitan_checkpoint(path):
        step = load_torchtitan_checkpoint(
            path, states=states, parts=parts, family=spec.name, head_dim=args.head_dim, model_only=model_only,
            exclude=config.exclude_from_loading,
        )  # fmt: skip
        what = "weights" if step is None else f"model, optimizer and schedule at step {step}"
        checkpointer.log(f"initial {what} from torchtitan checkpoint {path}")
        return step
    folder = resolve_checkpoint_folder(path, check=checkpointer.problem_with)  # verified, split over ranks
    manifest = folders.read_manifest(folder)
    ours = json.loads(json.dumps(dataclasses.asdict(args)))
    recorded = recorded_args(manifest, ours)
    if recorded != ours and not config.ignore_mismatch:
        changed = sorted(k for k in ours if recorded.get(k) != ours[k])
        raise CheckpointMismatch(
            f"initial weights {folder} have other model args ({', '.join(changed)}); "
            "pass --checkpoint.ignore_mismatch to load them anyway"
        )
    if model_only:
        checkpointer.load(folder, states, parts=("model",))
        return None
    if manifest.get("model_only"):
        raise CheckpointMismatch(
            f"checkpoint {folder} holds the model only: set checkpoint.initial_load_model_only = true to start "
            "from its weights at step 0"
        )
    checkpointer.load(folder, states, parts=TRAINING_PARTS)
    return states["train_state"].obj.step if "train_state" in checkpointer.loaded_parts else 0
