"""Throughput figures: the measured CPU peak from a controlled clock, MFU against every device of the
run, the peak cache per host and thread count, the GPU data-sheet figures, and the CPU's peak RSS."""

import json
from types import SimpleNamespace

import pytest
import torch

from lockstep.train.observe import throughput
from lockstep.train.observe.throughput import (
    CUDA_PEAK_FLOPS,
    measure_cpu_matmul_peak,
    mfu_percent,
    peak_cache_key,
    peak_flops,
    peak_memory_gib,
)


class TickingClock:
    """perf_counter that moves on by `tick` seconds at each reading: every timed matmul takes one tick."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_the_measured_peak_is_two_n_cubed_flops_per_matmul_time(monkeypatch):
    monkeypatch.setattr(throughput, "time", TickingClock(0.25))
    assert measure_cpu_matmul_peak(size=8, seconds=2.0) == 2 * 8**3 / 0.25


def test_mfu_is_against_the_peak_of_every_device_in_the_run():
    """The same per-device rate is the same MFU whatever the world size; a whole run's rate is not inflated."""
    assert mfu_percent(50.0, 100e12, 1) == pytest.approx(50.0)
    assert mfu_percent(100.0, 100e12, 2) == pytest.approx(50.0)
    assert mfu_percent(50.0, 100e12, 2) == pytest.approx(25.0)


def test_the_cpu_peak_is_measured_once_per_host_and_thread_count_and_cached(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(throughput, "measure_cpu_matmul_peak", lambda: measured.append(1) or 1e9 * len(measured))
    cache = tmp_path / "peak_flops.json"
    cpu = torch.device("cpu")
    assert peak_flops(cpu, "fp32", cache) == 1e9
    assert peak_flops(cpu, "bf16", cache) == 1e9 and len(measured) == 1  # read back, not measured again
    assert json.loads(cache.read_text()) == {peak_cache_key(torch.get_num_threads()): 1e9}
    threads = torch.get_num_threads()
    monkeypatch.setattr(throughput.torch, "get_num_threads", lambda: threads + 1)
    assert peak_flops(cpu, "fp32", cache) == 2e9 and len(measured) == 2  # another thread count: its own peak
    assert len(json.loads(cache.read_text())) == 2


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_an_unreadable_cache_is_measured_again_and_rewritten(tmp_path, monkeypatch, text):
    monkeypatch.setattr(throughput, "measure_cpu_matmul_peak", lambda: 3e9)
    cache = tmp_path / "peak_flops.json"
    cache.write_text(text)
    assert peak_flops(torch.device("cpu"), "fp32", cache) == 3e9
    assert list(json.loads(cache.read_text()).values()) == [3e9]


def test_the_cache_key_names_the_thread_count():
    assert peak_cache_key(4) != peak_cache_key(8) and peak_cache_key(4).endswith("/threads=4")


@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", CUDA_PEAK_FLOPS["H100"]["bf16"]),
        ("NVIDIA H100 80GB HBM3", "fp32", CUDA_PEAK_FLOPS["H100"]["fp32"]),
        ("NVIDIA A100-SXM4-40GB", "bf16", 312e12),
        ("NVIDIA A100-SXM4-40GB", "fp32", 19.5e12),
        ("Some Future GPU", "bf16", CUDA_PEAK_FLOPS["H100"]["bf16"]),
    ],
)
def test_a_gpu_is_measured_against_its_data_sheet_figure_for_the_precision(monkeypatch, name, precision, expected):
    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda device: name)
    assert peak_flops(torch.device("cuda", 0), precision) == expected


def test_the_cpus_peak_memory_is_the_resident_set_in_gib(monkeypatch):
    """Linux reports ru_maxrss in KiB."""
    monkeypatch.setattr(throughput.sys, "platform", "linux")
    monkeypatch.setattr(throughput.resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3 * 2**20))
    assert peak_memory_gib(torch.device("cpu")) == 3.0
