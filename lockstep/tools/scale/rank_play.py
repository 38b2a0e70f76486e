"""Play rank r of a W-rank FSDP job through the real trainer and count its file-system work by phase.

The process joins a mirror process group of W ranks (lockstep.tools.scale.mirror) and runs what
``lockstep train`` runs: the Trainer's start-up (config checks, data manifests, mesh, model, checkpoint
search), ``train()`` with its steps and its checkpoint save, then a second launch that resumes from
that save. The audit-hook counter (lockstep.tools.scale.io_counter) takes each phase apart:

- ``start_up``: building the Trainer of a fresh run;
- ``steps``: each training step, from one step's end to the next (its data, metrics, the loop's files);
- ``save``: the checkpoint save (synchronous here, so that its files are counted in it; an async save
  writes the same files from a thread);
- ``resume``: building the Trainer of the second launch, ``load`` (the checkpoint read) nested in it.

On rank r != 0, rank 0's share of a save (DCP's ``.metadata``, lockstep's manifest and publication) runs
uncounted, and the other W - 1 ranks' data files are written as copies of this rank's, uncounted: the
second launch then meets the folder a real job leaves, with W ranks' files in it. Rank 0 receives their
sizes and digests as it would from DCP's write results. One artefact remains: the load verifies the
checksum of about one peer file whose reader is not played (each file goes to the rank that reads it,
and an unread one to rank i mod W), which a real job's peers would read themselves. DCP's ``.metadata``
holds this rank's entries only; at W ranks it holds every rank's, about W times the size, and the
``metadata_bytes_at_world`` figure scales it.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from lockstep.checkpoint.manager import CheckpointManager
from lockstep.config import load_config
from lockstep.models.common import init as init_fns
from lockstep.tools.scale.io_counter import FileOps, counting_file_ops, not_counted
from lockstep.tools.scale.mirror import mirror_world
from lockstep.train.trainer import Trainer


@dataclass
class RankPlay:
    """One rank's counts by phase; ``initialised`` says how often parameters were drawn per launch."""

    rank: int
    world: int
    start_up: FileOps = field(default_factory=FileOps)
    steps: list[FileOps] = field(default_factory=list)
    save: FileOps = field(default_factory=FileOps)
    resume: FileOps = field(default_factory=FileOps)
    load: FileOps = field(default_factory=FileOps)
    initialised: list[int] = field(default_factory=list)
    metadata_bytes: int = 0

    def as_record(self, under: dict[str, Path]) -> dict:
        """Counts per phase, with the distinct files opened under each of `under`'s folders."""

        def row(ops: FileOps) -> dict:
            return ops.as_record() | {f"{name}_files": len(ops.opened_under(folder)) for name, folder in under.items()}

        return {
            "rank": self.rank,
            "world": self.world,
            "start_up": row(self.start_up),
            "steps": [row(ops) for ops in self.steps],
            "save": row(self.save),
            "resume": row(self.resume),
            "load": row(self.load),
            "initialised": self.initialised,
            "metadata_bytes_at_world": self.metadata_bytes * self.world,
        }


def job_overrides(*, dataset: Path, dump_folder: Path, world: int, steps: int, seq_len: int) -> list[str]:
    """A tiny Llama on a prepared folder, one sample per rank per step, sharded over all `world` ranks,
    checkpointed at the last step; a fresh machine cache of its own (so that plays count alike)."""
    return [
        "--job.dump_folder", str(dump_folder),
        "--data.cache_folder", str(dump_folder / "machine-cache"),
        "--model.flavor", "tiny",
        "--model.tokenizer", "bytes",
        "--training.dataset", "prepared",
        "--training.dataset_path", str(dataset),
        "--training.device", "cpu",
        "--training.steps", str(steps),
        "--training.seq_len", str(seq_len),
        "--training.local_batch_size", "1",
        "--training.global_batch_size", str(world),
        "--parallelism.data_parallel_shard_degree", str(world),
        "--lr_scheduler.warmup_steps", "1",
        "--checkpoint.enable",
        "--checkpoint.interval", str(steps),
        "--metrics.log_freq", "1",
        "--debug.seed", "7",
    ]  # fmt: skip


def play(
    rank: int,
    world: int,
    *,
    dataset: Path,
    dump_folder: Path,
    steps: int = 2,
    seq_len: int = 32,
    ranks_per_node: int = 8,
) -> RankPlay:
    """Rank `rank` of a `world`-rank job: a fresh launch that trains `steps` steps and saves, then a
    launch that resumes from the save; both through the real Trainer."""
    overrides = job_overrides(dataset=dataset, dump_folder=dump_folder, world=world, steps=steps, seq_len=seq_len)
    result = RankPlay(rank, world)
    with _rank_zero_share(rank, world, result):
        for launch in range(2):  # the trainer takes the process group down when it closes
            result.initialised.append(0)
            with mirror_world(rank, world, ranks_per_node), _counting_initialisation(result), _counting_loads(result):
                with counting_file_ops() as start:
                    trainer = Trainer(load_config("llama3_debug", overrides), show_progress=False)
                if launch == 0:
                    result.start_up = start
                    with trainer, _counting_steps(trainer, result), _counting_saves(trainer, result):
                        trainer.train()
                else:
                    result.resume = start
                    trainer.close()
    return result


@contextlib.contextmanager
def _counting_initialisation(result: RankPlay) -> Iterator[None]:
    original = init_fns.initialize_parameters

    def counted(*args, **kwargs):
        result.initialised[-1] += 1
        return original(*args, **kwargs)

    with mock.patch.object(init_fns, "initialize_parameters", counted):
        yield


@contextlib.contextmanager
def _counting_loads(result: RankPlay) -> Iterator[None]:
    original = CheckpointManager.load

    def counted(self, *args, **kwargs):
        with counting_file_ops() as ops:
            manifest = original(self, *args, **kwargs)
        result.load = ops
        return manifest

    with mock.patch.object(CheckpointManager, "load", counted):
        yield


@contextlib.contextmanager
def _counting_steps(trainer: Trainer, result: RankPlay) -> Iterator[None]:
    """Laps from one step's end to the next: ``comm.step_done`` ends each iteration of the loop."""
    laps = contextlib.ExitStack()
    original = trainer.comm.step_done

    def step_done(step: int) -> None:
        original(step)
        laps.close()
        result.steps.append(laps.enter_context(counting_file_ops()))

    result.steps.append(laps.enter_context(counting_file_ops()))
    with mock.patch.object(trainer.comm, "step_done", step_done):
        try:
            yield
        finally:
            laps.close()
            result.steps.pop()  # after the last step: the loop's end, not a step


@contextlib.contextmanager
def _counting_saves(trainer: Trainer, result: RankPlay) -> Iterator[None]:
    manager = trainer.checkpoints.manager
    original = manager.save

    def counted(*args, **kwargs) -> None:
        with counting_file_ops() as ops:
            original(*args, **kwargs)
        result.save = ops

    with mock.patch.object(manager, "save", counted):
        yield


@contextlib.contextmanager
def _rank_zero_share(rank: int, world: int, result: RankPlay) -> Iterator[None]:
    """What the other ranks and rank 0 would have written for a save, done uncounted: the peers' data
    files (copies of this rank's, with their sizes and digests in the write results rank 0 receives),
    then, on rank != 0, rank 0's publication."""
    original: Callable = CheckpointManager._publish

    def publish(self: CheckpointManager, step: int, partial: Path, manifest: dict, started, writer) -> None:
        result.metadata_bytes = (partial / ".metadata").stat().st_size
        with not_counted():
            own = [path.name for path in partial.iterdir() if path.name.startswith(f"__{rank}_")]
            recorded = getattr(writer.fs, "written", {})  # (an older lockstep left checksum files instead)
            for peer in range(world):
                for name in own if peer != rank else []:
                    copy = name.replace(f"__{rank}_", f"__{peer}_", 1)
                    shutil.copyfile(partial / name, partial / copy)
                    if name in recorded:
                        writer.files[copy] = recorded[name]
        if rank == 0:
            return original(self, step, partial, manifest, started, writer)
        with not_counted():
            if recorded:
                writer.files |= recorded
            self.rank = 0
            try:
                original(self, step, partial, manifest, started, writer)
            finally:
                self.rank = rank

    with mock.patch.object(CheckpointManager, "_publish", publish):
        yield
