"""torch.profiler traces and CUDA memory snapshots of chosen steps, built from the ``profiling`` section.

Tracing follows torchtitan's schedule: every ``profile_freq`` steps the profiler warms up for
``profiler_warmup`` steps and records ``profiler_active`` steps, so the traced steps are the last
ones of each window (steps 10, 20, ... with the defaults). Each rank writes Chrome/Perfetto JSON
(open it in https://ui.perfetto.dev or chrome://tracing) to
``<run>/<save_traces_folder>/iteration_<step>/rank<R>_trace.json``; each step is a ``lockstep_step
<N>`` span, whatever step the launch resumed at. Between traced windows the profiler is idle: only
the per-step bookkeeping is paid.

Memory snapshots (CUDA): the allocator's history is recorded from the start and dumped, as
torch.cuda.memory._dump_snapshot writes it (drag it onto https://pytorch.org/memory_viz), at the
steps listed in ``memory_snapshot_steps`` and when a step runs out of memory, by the ranks in
``memory_snapshot_ranks`` only (rank 0 by default: 512 ranks dumping 100k-entry pickles would load the
file system for nothing). On CPU there is no allocator history; the step
metrics carry the peak resident set size instead (lockstep.train.observe.step_metrics).

Files are never overwritten: a step traced again after a resume gets a new name.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from lockstep.config.sections import ProfilingConfig

SNAPSHOT_ENTRIES = 100_000
"""Allocator events kept in the CUDA memory history (torchtitan's default)."""


def _fresh(path: Path) -> Path:
    """`path`, or beside it a name no earlier launch used."""
    if not path.exists():
        return path
    return path.with_name(f"{path.stem}.pid{os.getpid()}{path.suffix}")


class Profiler:
    def __init__(self, profiling: ProfilingConfig, *, run_folder: Path, rank: int, device: torch.device) -> None:
        self.profiling = profiling
        self.traces = run_folder / profiling.save_traces_folder
        self.snapshots = run_folder / profiling.save_memory_snapshot_folder
        self.rank = rank
        ranks = profiling.memory_snapshot_ranks
        self.cuda_snapshots = (
            profiling.enable_memory_snapshot and device.type == "cuda" and (ranks == [-1] or rank in ranks)
        )
        self._profile: torch.profiler.profile | None = None
        self._step = 0

    def start(self, step: int) -> None:
        """Before the first step of this launch; `step` steps are already done."""
        self._step = step
        if self.cuda_snapshots:
            torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES)
        if not self.profiling.enable_profiling:
            return
        p = self.profiling
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(
            wait=p.profile_freq - p.profiler_warmup - p.profiler_active,
            warmup=p.profiler_warmup,
            active=p.profiler_active,
        )
        self._profile = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self._write)
        # Each traced window is a trace of its own: that is the point, not a caveat.
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events at the end of each cycle")
        # The schedule counts the run's steps, not this launch's: a resumed run traces the same steps.
        self._profile.step_num, self._profile.current_action = step, schedule(step)
        self._profile.start()

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around one training step: its span in the trace, its memory snapshot, the schedule's tick."""
        try:
            with torch.profiler.record_function(f"lockstep_step {step}") if self._profile else contextlib.nullcontext():
                yield
        except torch.OutOfMemoryError:
            self._snapshot(f"oom_step{step}")
            raise
        self._step = step
        if self._profile is not None:
            self._profile.step()
        if self.cuda_snapshots and step in self.profiling.memory_snapshot_steps:
            self._snapshot(f"iteration_{step}")

    def stop(self) -> None:
        if self._profile is not None:
            self._profile.stop()
            self._profile = None
        if self.cuda_snapshots:
            torch.cuda.memory._record_memory_history(enabled=None)

    def _write(self, profile: torch.profiler.profile) -> None:
        folder = self.traces / f"iteration_{self._step}"
        folder.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(_fresh(folder / f"rank{self.rank}_trace.json")))

    def _snapshot(self, name: str) -> None:
        if not self.cuda_snapshots:
            return
        folder = self.snapshots / name
        folder.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(_fresh(folder / f"rank{self.rank}_memory_snapshot.pickle")))
