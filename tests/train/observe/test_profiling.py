"""The profiler alone: the traced steps are the last of each window, counted in the run's steps (a
resumed launch traces the same ones), files are never overwritten, and snapshots are taken only by
the chosen ranks on CUDA."""

import json
import os

import pytest
import torch

from lockstep.config.sections import ProfilingConfig
from lockstep.train.observe.profiling import Profiler


def _run(profiler: Profiler, steps: range) -> None:
    profiler.start(steps.start - 1)
    for step in steps:
        with profiler.step(step):
            torch.ones(4, 4) @ torch.ones(4, 4)
    profiler.stop()


def _traced(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.json"))


def test_without_profiling_a_launch_writes_nothing(tmp_path):
    _run(Profiler(ProfilingConfig(), run_folder=tmp_path, rank=0, device=torch.device("cpu")), range(1, 5))
    assert list(tmp_path.iterdir()) == []


def test_the_last_step_of_each_window_is_traced_and_a_resumed_launch_traces_the_same_steps(tmp_path):
    profiling = ProfilingConfig(enable_profiling=True, profile_freq=2, profiler_warmup=1, profiler_active=1)
    _run(Profiler(profiling, run_folder=tmp_path / "a", rank=3, device=torch.device("cpu")), range(1, 5))
    traced = ["profile_traces/iteration_2/rank3_trace.json", "profile_traces/iteration_4/rank3_trace.json"]
    assert _traced(tmp_path / "a") == traced
    events = json.loads((tmp_path / "a" / traced[1]).read_text())["traceEvents"]
    assert "lockstep_step 4" in {event.get("name") for event in events}
    _run(Profiler(profiling, run_folder=tmp_path / "b", rank=3, device=torch.device("cpu")), range(4, 5))
    assert _traced(tmp_path / "b") == traced[1:]  # resumed after step 3: step 4 is still the one traced


def test_a_step_traced_again_after_a_resume_gets_a_new_file(tmp_path):
    profiling = ProfilingConfig(enable_profiling=True, profile_freq=2, profiler_warmup=1, profiler_active=1)
    folder = tmp_path / "profile_traces" / "iteration_2"
    folder.mkdir(parents=True)
    (folder / "rank0_trace.json").write_text("the first launch's")
    _run(Profiler(profiling, run_folder=tmp_path, rank=0, device=torch.device("cpu")), range(2, 3))
    assert (folder / "rank0_trace.json").read_text() == "the first launch's"
    assert (folder / f"rank0_trace.pid{os.getpid()}.json").exists()


@pytest.mark.parametrize(
    ("device", "enabled", "ranks", "rank", "snapshots"),
    [
        ("cuda", True, [0], 0, True),
        ("cuda", True, [0], 1, False),
        ("cuda", True, [-1], 7, True),
        ("cuda", True, [2, 7], 7, True),
        ("cuda", False, [-1], 0, False),
        ("cpu", True, [-1], 0, False),  # no allocator history on the CPU
    ],
)
def test_memory_snapshots_are_taken_on_cuda_by_the_chosen_ranks_only(tmp_path, device, enabled, ranks, rank, snapshots):
    profiling = ProfilingConfig(enable_memory_snapshot=enabled, memory_snapshot_ranks=ranks)
    profiler = Profiler(profiling, run_folder=tmp_path, rank=rank, device=torch.device(device))
    assert profiler.cuda_snapshots is snapshots


def test_an_out_of_memory_step_is_raised_on_without_a_snapshot_on_the_cpu(tmp_path):
    profiler = Profiler(
        ProfilingConfig(enable_memory_snapshot=True), run_folder=tmp_path, rank=0, device=torch.device("cpu")
    )
    profiler.start(0)
    with pytest.raises(torch.OutOfMemoryError), profiler.step(1):
        raise torch.OutOfMemoryError("out of memory")
    profiler.stop()
    assert list(tmp_path.iterdir()) == []
