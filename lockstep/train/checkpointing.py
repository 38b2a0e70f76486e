"""A run's checkpoints beside the training loop: what they hold, when they are saved, and how a launch
starts from one (resume, initial weights, or a seed checkpoint).

Built from the checkpoint section plus runtime objects (the states to save, the identity a resumed
checkpoint must match); the trainer only calls ``start``, ``save_if_due`` and ``close``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lockstep.checkpoint import folders
from lockstep.checkpoint.initial import load_initial
from lockstep.checkpoint.manager import CheckpointManager
from lockstep.checkpoint.states import ModelState
from lockstep.config.sections import CheckpointConfig
from lockstep.run.resume import check_config_change, resumed_config
from lockstep.train.optimizer import optimizer_hyperparameters, reset_optimizer_hyperparameters


class RunCheckpoints:
    def __init__(
        self,
        checkpoint: CheckpointConfig,
        *,
        run_folder: Path,
        identity: dict,
        states: dict,
        device: torch.device,
        log: Callable[[str], None],
        around_save: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.config = checkpoint
        self.around_save = around_save
        """Entered around each save (the trainer's: the long collective timeout while ranks write)."""
        self.run_folder = run_folder
        self.states = states
        """What a checkpoint holds, by part (model, optimizer, lr_scheduler, dataloader, train_state, rng)."""
        self.manager = CheckpointManager(checkpoint, dump_folder=run_folder, identity=identity, device=device, log=log)
        self.log = log
        self.resumed_from: Path | None = None
        self.saved_step: int | None = None
        """The step this launch saved last (a step redone under fault tolerance is not saved twice)."""

    def start(
        self,
        optimizers: list[torch.optim.Optimizer],
        spec,
        args,
        parts: list[nn.Module],
        fill_weights: Callable[[], None],
    ) -> bool:
        """Load the newest usable checkpoint of this run (True), or else checkpoint.initial_load_path, if
        any: True when it gave a step to go on from (initial_load_model_only = false), False for weights
        only. `fill_weights` draws the initial values of the (materialised, unfilled) parameters; it runs
        only when no checkpoint's model was loaded, so a resume of a large model spends nothing on values
        it overwrites. A resumed run keeps the optimizer hyperparameters of its config, not those the
        checkpoint carried, then its lr schedule; a run going on from another's step starts its data at
        that step of its own order."""
        from_config = optimizer_hyperparameters(optimizers)
        self.resumed_from = self.manager.resume(self.states, accept=self._accept)
        if self.resumed_from is None or "model" not in self.manager.loaded_parts:
            fill_weights()
        if self.resumed_from is None and self.config.initial_load_path:
            path = Path(self.config.initial_load_path)
            step = load_initial(path, checkpointer=self.manager, states=self.states, spec=spec, args=args, parts=parts)
            if step is None:
                return False
            self.states["dataloader"].obj.start_at_step(step)
            self.resumed_from = path
        if self.resumed_from is not None:
            reset_optimizer_hyperparameters(optimizers, from_config)
            self.states["lr_scheduler"].apply()
            return True
        return False

    def _accept(self, folder: Path) -> None:
        """Refuse a checkpoint of another setup, or one whose config differs in ways not allowed."""
        self.manager.check_identity(folder)
        previous, source = resumed_config(folders.read_manifest(folder), self.run_folder)
        ours = self.manager.identity["config"]
        check_config_change(
            previous, ours, allow=self.config.allow_config_change, checkpoint=folder, source=source, log=self.log
        )

    def save_seed(self) -> Path:
        """The model alone as step 0, published before this returns; any layout writes the same one
        (initialisation is per element, layout-free), each rank its shards."""
        self.manager.save(0, self.states, model_only=True)
        self.manager.close()
        return self.manager.root

    def save_if_due(self, step: int, last_step: int, stopping: bool, parts: list[nn.Module]) -> None:
        self.manager.poll()
        if step == self.saved_step or not self.manager.should_save(step, last_step, stopping):
            return
        model_only = self.config.model_only or (step == last_step and self.config.last_save_model_only)
        states = self.states
        if model_only and self.config.export_dtype == "bf16":
            states = states | {"model": ModelState(parts, dtype=torch.bfloat16)}
        with self.around_save():  # ranks that write at different speeds must not trip the train timeout
            self.manager.save(step, states, model_only=model_only)
        self.saved_step = step

    @property
    def saving(self) -> bool:
        """An async save is still being written."""
        return self.manager.saving

    def close(self) -> None:
        """Wait for an async save and publish it."""
        self.manager.close()
