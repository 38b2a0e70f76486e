"""Per-step time and memory of every rank, for spotting stragglers and the rank that runs out of memory.

Each rank times its steps locally (no collective, no device sync: on CUDA the compute span is a pair
of CUDA events read once the step's own host sync has passed them). Only on logged steps, which all
ranks share, one small all-gather brings every rank's figures together:

- ``step_time_s``: wall time per step on rank 0, the mean since the last record;
- ``max_rank_step_time_s`` / ``min_rank_step_time_s`` / ``slowest_rank``: each rank's *compute* time
  per step, from the step's start until its own forward and backward are done, before it waits for
  the gradient sum across data-parallel replicas. In data-parallel layouts that wait is where a fast
  rank would absorb a slow one's delay, so the slowest rank stands out here. Inside FSDP, tensor and
  pipeline parallelism the collectives within forward and backward make every rank wait for the
  slowest, and the spread narrows;
- ``memory/peak_gib_min`` / ``memory/peak_gib_max``: the lowest and highest per-rank peak since the
  last record (CUDA: allocated bytes; CPU: resident set size, the kernel's high-water mark reset at
  each record), and ``memory_gib``: this rank's peak over the launch.

With ``timeline``, the CPU high-water mark is read and reset every step and written one line per step
to that file (the CPU substitute for a CUDA memory snapshot).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lockstep.config.sections import ProfilingConfig
from lockstep.run.jsonl import JsonlWriter
from lockstep.train.observe.throughput import peak_memory_gib

_HIGH_WATER = re.compile(r"VmHWM:\s+(\d+) kB")


def _resident_peak_gib() -> float:
    """This process's peak resident set size since the last reset (Linux), then reset."""
    try:
        peak_kib = int(_HIGH_WATER.search(Path("/proc/self/status").read_text()).group(1))
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    except (OSError, AttributeError):  # no procfs: the lifetime peak
        return peak_memory_gib(torch.device("cpu"))
    return peak_kib / 2**20


def take_peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the last call: CUDA allocated bytes, or the process's resident set on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return _resident_peak_gib()


def memory_timeline(profiling: ProfilingConfig, *, run_folder: Path, rank: int, device: torch.device) -> Path | None:
    """With profiling.enable_memory_snapshot on CPU: this rank's per-step peak-RSS file (its folder made)."""
    if not profiling.enable_memory_snapshot or device.type == "cuda":
        return None
    folder = run_folder / profiling.save_memory_snapshot_folder
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"rank{rank}_rss.jsonl"


class StepMetrics:
    def __init__(
        self, device: torch.device, group: dist.ProcessGroup | None = None, timeline: Path | None = None
    ) -> None:
        self.device = device
        self.group = group
        """The ranks pooled on a record: the job's (None: the default group, when there is one)."""
        self.timeline = JsonlWriter(timeline) if timeline is not None else None
        self.launch_peak_gib = 0.0
        self._interval_peak_gib = 0.0
        self._wall_s = 0.0
        self._compute_s = 0.0
        self._steps = 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._started = 0.0
        self._start_event: torch.cuda.Event | None = None
        self._compute_mark: float | None = None

    def begin(self) -> None:
        self._started, self._compute_mark = time.perf_counter(), None
        if self.device.type == "cuda":
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()

    def compute_done(self) -> None:
        """This rank's forward and backward are done (called before the cross-replica gradient wait)."""
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start_event, end))
        else:
            self._compute_mark = time.perf_counter() - self._started

    def end(self, step: int) -> None:
        wall = time.perf_counter() - self._started
        self._wall_s += wall
        if self.device.type != "cuda":
            self._compute_s += wall if self._compute_mark is None else self._compute_mark
        self._steps += 1
        if self.timeline is not None and self.device.type != "cuda":
            peak = self._note_peak(_resident_peak_gib())
            self.timeline.append({"step": step, "peak_rss_gib": peak})

    def _note_peak(self, peak: float) -> float:
        self._interval_peak_gib = max(self._interval_peak_gib, peak)
        self.launch_peak_gib = max(self.launch_peak_gib, peak)
        return peak

    def record(self) -> dict[str, float | int]:
        """The figures since the last record; a collective on every rank of the group when distributed."""
        steps = max(self._steps, 1)
        if self._events:  # complete: the step's host sync (its loss read) came after them
            self._compute_s = sum(start.elapsed_time(end) for start, end in self._events) / 1e3
        compute = self._compute_s / steps
        self._note_peak(take_peak_memory_gib(self.device))
        mine = torch.tensor([compute, self._interval_peak_gib], dtype=torch.float64)
        ranks = mine.reshape(1, 2)
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            mine = mine.to(self.device)
            ranks = torch.empty(dist.get_world_size(self.group) * 2, dtype=torch.float64, device=self.device)
            dist.all_gather_single(ranks, mine, group=self.group)
            ranks = ranks.reshape(-1, 2).cpu()
        record = {
            "step_time_s": self._wall_s / steps,
            "max_rank_step_time_s": float(ranks[:, 0].max()),
            "min_rank_step_time_s": float(ranks[:, 0].min()),
            "slowest_rank": int(ranks[:, 0].argmax()),
            "memory_gib": self.launch_peak_gib,
            "memory/peak_gib_min": float(ranks[:, 1].min()),
            "memory/peak_gib_max": float(ranks[:, 1].max()),
        }
        self._wall_s = self._compute_s = 0.0
        self._steps, self._events, self._interval_peak_gib = 0, [], 0.0
        return record
