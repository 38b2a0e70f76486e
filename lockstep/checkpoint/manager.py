"""Save and resume: when, where, what, and refusing what does not belong to this run.

Rerunning the same command on the same dump folder resumes from the newest intact checkpoint.
Every save goes to a ``.partial`` folder that rank 0 publishes (manifest, fsync, rename) once all
ranks have written (lockstep.checkpoint.folders). Async saves stage a copy on the calling thread,
write from a background thread over a separate gloo group, and are published when done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from lockstep.checkpoint import folders
from lockstep.checkpoint.safe_reader import SafeFileSystemReader
from lockstep.config.sections import CheckpointConfig

MODEL_ONLY_PARTS = ("model",)


class CheckpointMismatch(ValueError):
    pass


def _plain(value):
    """JSON round trip, so tuples and lists (and int keys) compare equal."""
    return json.loads(json.dumps(value))


class CheckpointManager:
    def __init__(
        self,
        checkpoint: CheckpointConfig,
        dump_folder: Path,
        identity: dict,
        device: torch.device,
        log: Callable[[str], None] = print,
    ) -> None:
        """`identity` describes what a checkpoint must match to be resumed: model name/flavor/args and
        the tokenizer and dataset fingerprints (also the layout, which is recorded but may differ)."""
        self.config = checkpoint
        self.root = dump_folder / checkpoint.folder
        self.identity = identity
        self.device = device
        self.log = log
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self._pending: tuple[Future, int, Path, dict] | None = None
        self._async_group = None
        if self.config.async_mode != "disabled" and self.distributed:
            self._async_group = dist.new_group(backend="gloo")  # keeps background writes off the training group
        self.timings: dict[str, float] = {}
        if self.config.async_mode == "async_with_pinned_mem" and device.type != "cuda":
            log("note: checkpoint.async_mode async_with_pinned_mem needs CUDA; saving async from pageable memory")

    # -- resume ---------------------------------------------------------------------------------

    def find_resume_folder(self) -> Path | None:
        if not self.config.enable:
            return None
        return folders.find_checkpoint(self.root, self.config.load_step, self.log, prefer_full=True)

    def check_identity(self, folder: Path) -> None:
        manifest = folders.read_manifest(folder)
        differences = [
            f"{key}: checkpoint {_plain(manifest.get(key))} vs this run {_plain(value)}"
            for key, value in self.identity.items()
            if key != "layout" and _plain(manifest.get(key)) != _plain(value)
        ]
        if differences and not self.config.ignore_mismatch:
            raise CheckpointMismatch(
                f"checkpoint {folder} was written by a different setup; " + "; ".join(differences)
                + ". Use another job.dump_folder, or pass --checkpoint.ignore_mismatch to load it anyway"
            )  # fmt: skip
        for difference in differences:
            self.log(f"warning: loading despite a mismatch ({difference})")

    def load(self, folder: Path, states: dict, parts: tuple[str, ...] | None = None) -> dict:
        """Load the chosen parts of `states` from `folder` in place; returns the manifest."""
        started = time.perf_counter()
        manifest = folders.read_manifest(folder)
        wanted = set(parts if parts is not None else states) - set(self.config.exclude_from_loading)
        if self.config.model_only or manifest.get("model_only"):
            wanted &= set(MODEL_ONLY_PARTS)
        reader = SafeFileSystemReader(str(folder))
        stored = {key.split(".")[0] for key in reader.read_metadata().state_dict_metadata}
        if "rng" in wanted and not self._rng_is_stored(reader, states["rng"]):
            self.log("note: the checkpoint has no RNG state for this pipeline rank (different PP degree); reseeded")
            wanted.discard("rng")
        missing = sorted(wanted - stored)
        if missing:
            raise CheckpointMismatch(f"checkpoint {folder} has no {', '.join(missing)} (it holds {sorted(stored)})")
        dcp.load({name: states[name] for name in sorted(wanted)}, storage_reader=reader)
        self.timings["load_s"] = time.perf_counter() - started
        self.log(f"loaded {', '.join(sorted(wanted))} from {folder} in {self.timings['load_s']:.2f}s")
        return manifest

    @staticmethod
    def _rng_is_stored(reader: SafeFileSystemReader, rng_state) -> bool:
        prefix = f"rng.{rng_state.key}."
        return any(key.startswith(prefix) for key in reader.read_metadata().state_dict_metadata)

    # -- save -----------------------------------------------------------------------------------

    def should_save(self, step: int, last_step: int, stopping: bool) -> bool:
        return self.config.enable and (step % self.config.interval == 0 or step == last_step or stopping)

    def save(self, step: int, states: dict, model_only: bool = False, layout: dict | None = None) -> None:
        """Write `states` (or only the model) as step `step`; publish it now (sync) or when written."""
        self.wait()  # one save in flight at a time
        started = time.perf_counter()
        partial = folders.partial_folder(self.root, step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            folders.prune(self.root, 0)  # leftovers of interrupted saves
        self._barrier()
        to_save = {"model": states["model"]} if model_only else states
        manifest = self.identity | {
            "format": 1,
            "step": step,
            "model_only": model_only,
            "parts": sorted(to_save),
            "layout": layout or self.identity.get("layout", {}),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        writer = FileSystemWriter(str(partial), sync_files=True)
        if self.config.async_mode == "disabled":
            dcp.save(to_save, storage_writer=writer)
            self._publish(step, partial, manifest, started)
            return
        future = dcp.async_save(
            to_save, storage_writer=writer, process_group=self._async_group, async_stager=self._stager()
        )
        self.timings["save_blocking_s"] = time.perf_counter() - started
        self._pending = (future, step, partial, manifest)

    def _stager(self):
        """Stage (copy) the state synchronously, so training can go on at once; in pinned host memory
        when asked and the device is CUDA (the CPU has no pinned memory to speak of)."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        pinned = self.config.async_mode == "async_with_pinned_mem" and self.device.type == "cuda"
        return DefaultStager(
            StagingOptions(
                use_pinned_memory=pinned, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False
            )
        )

    def wait(self) -> None:
        """Finish and publish an async save still in flight."""
        if self._pending is None:
            return
        future, step, partial, manifest = self._pending
        self._pending = None
        future.result()
        self._publish(step, partial, manifest, None)

    def poll(self) -> None:
        """Publish an async save that has finished, without waiting for one that has not."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def _publish(self, step: int, partial: Path, manifest: dict, started: float | None) -> None:
        # DCP's save returns on every rank only after rank 0 wrote the metadata, i.e. after all ranks
        # finished writing, so rank 0 can publish without another collective.
        if self.rank == 0:
            folders.publish(partial, folders.step_folder(self.root, step), manifest)
            folders.prune(self.root, self.config.keep_latest_k)
        if started is not None:
            self.timings["save_s"] = time.perf_counter() - started
            self.log(f"saved checkpoint step {step} in {self.timings['save_s']:.2f}s")
        else:
            self.log(f"saved checkpoint step {step} (async)")

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        self.wait()
