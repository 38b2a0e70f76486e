"""Save and resume: when, where, what, and refusing what does not belong to this run.

Rerunning the same command on the same dump folder resumes from the newest intact checkpoint:
sizes and the pickle allow-list are checked first (cheap; the ranks agree over gloo), the content
checksums while the checkpoint loads (each file hashed by one rank as it is read; a failure on any
rank fails the load on all, through DCP's read step). A damaged or unsafe checkpoint is reported and
set aside (renamed ``step-N.unloadable``) for the next older one, whose load overwrites whatever the
failed load had written. Loading reads non-tensor items only through the allow-list
(lockstep.checkpoint.safe_reader). Newer checkpoints than the one resumed
(an explicit load_step, or step folders that hold nothing loadable) are never overwritten unless
checkpoint.discard_newer says so; the run's own newer model-only exports are replaced when reached.
Every save goes to a ``.partial`` folder that rank 0 publishes (manifest, checksums, fsync, rename)
once all ranks have written (lockstep.checkpoint.folders). Async saves stage a copy on the calling
thread, write from a background thread over a separate gloo group, and are published when done.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from lockstep.checkpoint import folders
from lockstep.checkpoint.checksums import ChecksumWriter
from lockstep.checkpoint.errors import CheckpointError, CheckpointMismatch, disk_failure, save_refused
from lockstep.checkpoint.manifest import recorded_args
from lockstep.checkpoint.safe_reader import SafeFileSystemReader, SafeLoadPlanner
from lockstep.config.sections import CheckpointConfig
from lockstep.errors import LockstepError
from lockstep.parallel.reducer import agreed_problem

MODEL_ONLY_PARTS = ("model",)
RECORDED_ONLY = ("layout", "config", "model_overrides")
"""Identity entries written to the manifest for the record, not compared by check_identity."""


def _checkpoint_error(failure: CheckpointException) -> LockstepError | None:
    """Our own error inside DCP's wrapper (DCP gathers every rank's failure), if it is one."""
    for exc, _ in failure.failures.values():
        if isinstance(exc, LockstepError):
            return exc
    return None


def _is_export(folder: Path) -> bool:
    """A published model-only checkpoint (a seed or a final export, reproducible by the run)."""
    try:
        return folders.has_manifest(folder) and bool(folders.read_manifest(folder).get("model_only"))
    except (OSError, ValueError):
        return False


def _plain(value):
    """JSON round trip, so tuples and lists (and int keys) compare equal."""
    return json.loads(json.dumps(value))


UNSET = "(unset)"
"""Shown for a key that one side of a comparison does not have."""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``model.args.dim``), so a difference names the one value that
    changed rather than a whole section; lists and other values are leaves."""
    if not isinstance(value, dict):
        return {prefix: value} if prefix else {}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat |= flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    return flat


def differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """key -> (old, new) for every dotted key whose value differs (compared as JSON, so tuples
    equal lists); a key on one side only has UNSET on the other."""
    before, after = flatten(_plain(old)), flatten(_plain(new))
    keys = list(before) + [k for k in after if k not in before]
    changed = {k: (before.get(k, UNSET), after.get(k, UNSET)) for k in keys}
    return {k: (a, b) for k, (a, b) in changed.items() if a != b}


def describe_differences(changed: dict[str, tuple[Any, Any]]) -> str:
    """``model.args.dim: 64 -> 128; optimizer.lr: 0.0008 -> 0.002`` (one line)."""

    def show(value: Any) -> str:
        return value if isinstance(value, str) and value else json.dumps(value)

    return "; ".join(f"{key}: {show(a)} -> {show(b)}" for key, (a, b) in changed.items())


class CheckpointManager:
    def __init__(
        self,
        checkpoint: CheckpointConfig,
        *,
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
        self._pending: tuple[Future, int, Path, dict, ChecksumWriter] | None = None
        self._verified: set[Path] = set()
        self._failed: dict[Path, str] = {}  # why a checkpoint failed while loading (resume)
        self._problems: dict[Path, str] = {}  # why a folder was found damaged (named if it is in the way)
        self._loading: set[str] = set()  # the parts the last load wrote (or was writing when it failed)
        self._replaceable: set[int] = set()
        self._async_group = None
        if self.distributed:
            # Keeps background writes and the verdicts of checkpoint checks off the training group.
            self._async_group = dist.new_group(backend="gloo")
        self.timings: dict[str, float] = {}
        if self.config.async_mode == "async_with_pinned_mem" and device.type != "cuda":
            log("note: checkpoint.async_mode async_with_pinned_mem needs CUDA; saving async from pageable memory")

    # -- resume ---------------------------------------------------------------------------------

    def find_resume_folder(self, accept: Callable[[Path], None] = lambda folder: None) -> Path | None:
        """The checkpoint to resume from (verified), after settling what happens to newer step folders:
        refused unless checkpoint.discard_newer (then deleted), set aside if damaged, or (the run's own
        model-only exports) replaced when training reaches them. `accept(folder)` (the caller's checks,
        which may raise) runs before anything is deleted or set aside, so a refused resume loses nothing."""
        if not self.config.enable:
            return None
        steps = folders.published_steps(self.root)
        folder = folders.find_checkpoint(
            self.root, self.config.load_step, self.log, prefer_full=True, check=self.problem_with
        )
        if folder is not None:
            accept(folder)
        resumed = next((s for s, f in steps if f == folder), -1)
        newer = [(s, f) for s, f in steps if s > resumed]
        in_the_way, exports = newer, []
        if folder is not None and self.config.load_step < 0:  # fell back past damaged ones, or exports
            exports = [(s, f) for s, f in newer if _is_export(f)]
            self._set_aside([f for s, f in newer if (s, f) not in exports])
            in_the_way = []
        if in_the_way and not self.config.discard_newer:
            listed = ", ".join(str(s) for s, _ in in_the_way)
            what = f"training from step {resumed}" if folder is not None else "a fresh start (nothing there loads)"
            reasons = self._problems | self._failed
            damage = "".join(f"; step {s}: {reasons[f]}" for s, f in in_the_way if f in reasons)
            raise CheckpointError(
                self.root, f"checkpoints newer than the one resumed exist (steps {listed}) and {what} would overwrite them{damage}",
                "pass --checkpoint.discard_newer to delete them, or resume from the newest",
            )  # fmt: skip
        if in_the_way:
            self.log(f"discarding checkpoints {', '.join(str(s) for s, _ in in_the_way)} (checkpoint.discard_newer)")
            if self.rank == 0:
                for _, stale in in_the_way:
                    shutil.rmtree(stale)
        for step, _ in exports:
            self.log(f"note: model-only checkpoint step {step} is newer than step {resumed}; replaced when reached")
            self._replaceable.add(step)
        self._barrier()
        return folder

    def resume(self, states: dict, accept: Callable[[Path], None] = lambda folder: None) -> Path | None:
        """Load the newest intact checkpoint into `states` and return its folder (None: nothing to
        resume): find_resume_folder, with `accept(folder)` (the caller's checks of its manifest, which
        may raise) before anything is deleted or set aside, then load. A checkpoint that fails while loading (a checksum, verified as it is
        read) is then treated like one found damaged before (reported, and set aside once an older one
        is found), and the next older one is loaded; it overwrites every part the failed load wrote,
        or the resume stops with the way out. With an explicit checkpoint.load_step the failure is the
        error."""
        written: set[str] = set()
        while (folder := self.find_resume_folder(accept)) is not None:
            try:
                self.load(folder, states)
            except CheckpointError as e:
                if self.config.load_step >= 0:
                    raise CheckpointError(
                        folder, f"damaged checkpoint: {e.problem}", "choose another checkpoint.load_step"
                    ) from None
                written |= self._loading
                self._failed[folder] = e.problem  # every rank has the same failure (DCP gathers them)
                self._verified.discard(folder)
                continue
            if leftover := sorted(written - self._loading):
                raise CheckpointError(
                    folder, f"a newer checkpoint failed its checksum while loading and this one holds no {', '.join(leftover)} to replace what it wrote",
                    "run the same command again: the damaged checkpoint is set aside, so the resume starts clean from this one",
                )  # fmt: skip
            return folder
        if written:  # nothing older loads (the failed one was discarded): the states are not fresh either
            raise CheckpointError(
                self.root, "a checkpoint failed its checksum while loading and no older one loads",
                "run the same command again to start fresh",
            )  # fmt: skip
        return None

    @property
    def loaded_parts(self) -> frozenset[str]:
        """The parts the last load wrote (the model is absent when it was excluded from loading)."""
        return frozenset(self._loading)

    def problem_with(self, folder: Path) -> str | None:
        """folders.problem_with (each rank the sizes of its share of the files, rank 0 the allow-listed
        items), with the verdicts agreed (so every rank takes the same decision); a clean folder is not
        checked again on load. The checksums are verified during the load."""
        if folder in self._failed:  # failed while loading (the ranks agree already)
            return self._failed[folder]
        started = time.perf_counter()
        world = dist.get_world_size() if self.distributed else 1
        problem = folders.problem_with(folder, content=self.rank == 0, share=(self.rank, world))
        if self.distributed:
            problem = agreed_problem(problem, self._async_group)
        self.timings["verify_s"] = self.timings.get("verify_s", 0.0) + time.perf_counter() - started
        if problem is None:
            self._verified.add(folder)
        else:
            self._problems[folder] = problem
        return problem

    def _set_aside(self, damaged: list[Path]) -> None:
        """Rename damaged or manifest-less step folders newer than the resumed one, so that no save
        overwrites them and nothing loads them; a person decides what they were."""
        for folder in damaged:
            target = folder.with_name(f"{folder.name}.unloadable")
            n = 1
            while target.exists():
                n += 1
                target = folder.with_name(f"{folder.name}.unloadable-{n}")
            self.log(f"set aside unloadable checkpoint {folder} as {target.name} (not loaded, pruned or overwritten)")
            if self.rank == 0:
                folder.rename(target)

    def check_identity(self, folder: Path) -> None:
        """Refuse a checkpoint whose model or fingerprints differ from this run's, naming only the
        differing keys (checkpoint -> this run). The layout (elastic) and the config (the trainer
        decides which of its changes are allowed) are recorded in the manifest but not compared here."""
        manifest = folders.read_manifest(folder)
        manifest["model"] |= {"args": recorded_args(manifest, self.identity.get("model", {}).get("args", {}))}
        compared = [key for key in self.identity if key not in RECORDED_ONLY]
        changed = differences({k: manifest.get(k) for k in compared}, {k: self.identity[k] for k in compared})
        if changed and not self.config.ignore_mismatch:
            raise CheckpointMismatch(
                f"checkpoint {folder} was written by a different setup (checkpoint -> this run: "
                f"{describe_differences(changed)}). Use another job.dump_folder, or pass "
                "--checkpoint.ignore_mismatch to load it anyway"
            )
        if changed:
            self.log(f"warning: loading despite a mismatch (checkpoint -> this run: {describe_differences(changed)})")

    def load(self, folder: Path, states: dict, parts: tuple[str, ...] | None = None) -> dict:
        """Load the chosen parts of `states` from `folder` in place (checked first unless it was found
        by find_resume_folder; the checksums are verified as the files are read, and a mismatch raises
        CheckpointError on every rank, with `states` partly overwritten); returns the manifest.
        timings["verify_s"]: this rank's time on the checks and on hashing (and reading gaps)."""
        started = time.perf_counter()
        self.timings.pop("verify_s", None)
        self._loading = set()
        if folder not in self._verified and (problem := self.problem_with(folder)):
            raise CheckpointError(folder, f"damaged checkpoint: {problem}", "load another checkpoint")
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
        self._loading = wanted
        keys = reader.read_metadata().state_dict_metadata
        for name in wanted:  # keys added since the checkpoint was written keep their defaults
            optional = getattr(states[name], "optional", ())
            states[name].absent = {key for key in optional if f"{name}.{key}" not in keys} if optional else set()
        try:
            dcp.load(
                {name: states[name] for name in sorted(wanted)},
                storage_reader=reader,
                planner=SafeLoadPlanner(folder=str(folder)),
            )
        except CheckpointException as failure:
            raise (_checkpoint_error(failure) or failure) from None
        finally:
            for name in wanted:
                if getattr(states[name], "optional", ()):
                    states[name].absent = set()
            self.timings["verify_s"] = self.timings.get("verify_s", 0.0) + reader.verify_seconds
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
            "format": folders.FORMAT,
            "step": step,
            "model_only": model_only,
            "parts": sorted(to_save),
            "layout": layout or self.identity.get("layout", {}),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        writer = ChecksumWriter(str(partial), sync_files=True)
        if self.config.async_mode == "disabled":
            with self._refusals(partial):
                dcp.save(to_save, storage_writer=writer)
                self._publish(step, partial, manifest, started, writer)
            return
        future = dcp.async_save(
            to_save, storage_writer=writer, process_group=self._async_group, async_stager=self._stager()
        )
        self.timings["save_blocking_s"] = time.perf_counter() - started
        self._pending = (future, step, partial, manifest, writer)

    def _stager(self):
        """Stage (copy) the state synchronously, so training can go on at once; in pinned host memory
        when asked and the device is CUDA (the CPU has no pinned memory to speak of)."""
        pinned = self.config.async_mode == "async_with_pinned_mem" and self.device.type == "cuda"
        return DefaultStager(
            StagingOptions(
                use_pinned_memory=pinned, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False
            )
        )

    @property
    def saving(self) -> bool:
        """An async save is still being written."""
        return self._pending is not None

    def wait(self) -> None:
        """Finish and publish an async save still in flight."""
        if self._pending is None:
            return
        future, step, partial, manifest, writer = self._pending
        self._pending = None
        with self._refusals(partial):
            future.result()
            self._publish(step, partial, manifest, None, writer)

    def poll(self) -> None:
        """Publish an async save that has finished, without waiting for one that has not."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def _publish(self, step: int, partial: Path, manifest: dict, started: float | None, writer: ChecksumWriter) -> None:
        # DCP's save returns on every rank only after rank 0 wrote the metadata, i.e. after all ranks
        # finished writing; their files' sizes and digests came to rank 0 with DCP's write results.
        self.timings["checksum_s"] = writer.hash_seconds  # this rank's hashing time
        if self.rank == 0:
            replace = self.config.discard_newer or step in self._replaceable
            folders.publish(partial, folders.step_folder(self.root, step), manifest, writer.files, replace=replace)
            folders.prune(self.root, self.config.keep_latest_k)
        if started is not None:
            self.timings["save_s"] = time.perf_counter() - started
            self.log(f"saved checkpoint step {step} in {self.timings['save_s']:.2f}s")
        else:
            self.log(f"saved checkpoint step {step} (async)")

    @contextlib.contextmanager
    def _refusals(self, partial: Path) -> Iterator[None]:
        """A save the file system refuses (a full disk) ends in one line naming the folder and the newest
        complete checkpoint, not in DCP's per-rank tracebacks."""
        try:
            yield
        except BaseException as error:  # DCP wraps rank failures in CheckpointException, a BaseException
            if (refusal := disk_failure(error)) is None:
                raise
            newest = max((s for s, f in folders.published_steps(self.root) if folders.has_manifest(f)), default=None)
            raise save_refused(partial, refusal, newest) from None

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        self.wait()
