"""The estimate's check: the same rank step run for real, on real tensors and a real process group,
measured by instruments the estimate does not use for memory (torch's ``MemTracker``) and by the same
``WireCounter`` for the wire (so the comparison is call for call).

Every rank of a real job (gloo on CPU, or one process) calls ``measure_rank``; the tests and
``benchmarks/estimate_accuracy.py`` compare its figures with ``trace_rank``'s for the same rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker
from torch.profiler import ProfilerActivity, profile

from lockstep.config import JobConfig
from lockstep.config.job import ParallelDims
from lockstep.parallel.canonical import local_tensor
from lockstep.tools.estimate.rank_step import RankStep
from lockstep.tools.estimate.wire import Traffic, WireCounter


@dataclass
class Measured:
    rank: int
    peak_bytes: int
    """The step's peak (optimizer state already there), by the instrument asked for."""
    traffic: Traffic


def measure_rank(
    config: JobConfig,
    dims: ParallelDims,
    *,
    ranks_per_node: int,
    vocab_size: int,
    attention_backend: str = "sdpa",
    instrument: str = "auto",
    device: torch.device | None = None,
) -> Measured:
    """Run this rank's step for real (the default process group, if any, is the job's). `instrument`:
    ``memtracker``, torch's MemTracker: every tensor PyTorch allocates, as a GPU's caching allocator
    would be asked for them; ``allocator``, the CPU allocator's own record of every allocation and free
    (torch.profiler's memory events), which also holds gloo's own staging buffers and the tensors its
    worker threads keep until a collective completes (NCCL makes neither; up to ~20% of a tiny model's
    peak here); ``auto``, MemTracker except under pipelining, whose stage backward (``autograd.grad``)
    MemTracker's module hooks refuse. On a CUDA `device` the allocator's own peak
    (``torch.cuda.max_memory_allocated``) is taken."""
    if instrument == "auto":
        instrument = "allocator" if dims.pp > 1 else "memtracker"
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = device or torch.device("cpu")
    step = RankStep(
        config, dims, vocab_size=vocab_size, device=device, attention_backend=attention_backend,
        ranks_per_node=ranks_per_node,
    )  # fmt: skip
    step.create_optimizer_state()
    counter = WireCounter(rank, ranks_per_node)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with counter:
            step.run()
        torch.cuda.synchronize(device)
        return Measured(rank, torch.cuda.max_memory_allocated(device), counter.traffic)
    if instrument == "memtracker":
        tracker = MemTracker()
        tracker.track_external(*step.model.parts, *step.optimizers)
        with tracker, counter:
            step.run()
        peak = sum(
            nbytes for device_stats in tracker.get_tracker_snapshot("peak").values()
            for category, nbytes in device_stats.items() if category != "Total"
        )  # fmt: skip
        return Measured(rank, peak, counter.traffic)
    held = _held_bytes(step)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler, counter:
        step.run()
    return Measured(rank, held + _peak_of_allocations(profiler), counter.traffic)


def _held_bytes(step: RankStep) -> int:
    """Bytes held before the step: parameters, buffers and optimizer state (each storage once)."""
    tensors = [p for part in step.model.parts for p in [*part.parameters(), *part.buffers()]]
    tensors += step.optimizer_state()
    storages = {}
    for t in tensors:
        t = local_tensor(t)
        storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _peak_of_allocations(profiler) -> int:
    """The highest running sum of the CPU allocator's allocations and frees during the step, in the
    order the allocator saw them (the profiler's raw memory records)."""
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak
