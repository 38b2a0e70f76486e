"""StepMetrics and its memory timeline, built with no trainer."""

import json

import torch

from lockstep.config.sections import ProfilingConfig
from lockstep.train.observe.step_metrics import StepMetrics, memory_timeline


def test_the_memory_timeline_is_a_cpu_option(tmp_path):
    off = ProfilingConfig()
    on = ProfilingConfig(enable_memory_snapshot=True)
    assert memory_timeline(off, run_folder=tmp_path, rank=0, device=torch.device("cpu")) is None
    assert memory_timeline(on, run_folder=tmp_path, rank=0, device=torch.device("cuda", 0)) is None
    path = memory_timeline(on, run_folder=tmp_path, rank=2, device=torch.device("cpu"))
    assert path == tmp_path / on.save_memory_snapshot_folder / "rank2_rss.jsonl" and path.parent.is_dir()


def test_each_step_adds_one_line_to_the_timeline(tmp_path):
    metrics = StepMetrics(torch.device("cpu"), timeline=tmp_path / "rss.jsonl")
    for step in (1, 2):
        metrics.begin()
        metrics.end(step)
    lines = [json.loads(line) for line in (tmp_path / "rss.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(line["peak_rss_gib"] > 0 for line in lines)
    record = metrics.record()  # no process group: this rank's figures
    assert record["slowest_rank"] == 0 and record["memory_gib"] >= max(line["peak_rss_gib"] for line in lines)
