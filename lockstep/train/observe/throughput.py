"""Throughput figures: the device's peak matmul rate (for MFU) and peak memory."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from lockstep.data.cache import atomic_path
from lockstep.untrusted import parse_json

# Dense (non-sparse) tensor-core peaks in FLOP/s, from the vendors' data sheets.
CUDA_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}


def measure_cpu_matmul_peak(size: int = 1024, seconds: float = 0.5) -> float:
    """Best fp32 FLOP/s of square matmuls on this CPU with the current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_cache_key(threads: int) -> str:
    """The key of a measured CPU peak in peak_flops.json: the peak depends on the host and thread count."""
    return f"{platform.node()}/{platform.processor()}/threads={threads}"


def mfu_percent(tflops: float, device_peak_flops: float, world_size: int) -> float:
    """Model FLOPs utilisation in percent. ``tflops`` is the whole run's rate (global tokens/s times
    FLOPs per token), so it is measured against the peak of every device in the run, not of one
    (which would inflate MFU by the world size)."""
    return 100 * tflops * 1e12 / (world_size * device_peak_flops)


def peak_flops(device: torch.device, mixed_precision: str, cache_file=None) -> float:
    """FLOP/s that MFU is measured against: a data-sheet figure on known GPUs, else the measured
    matmul peak of this CPU (cached per host and thread count)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in CUDA_PEAK_FLOPS.items():
            if key in name:
                return peaks["bf16" if mixed_precision == "bf16" else "fp32"]
        return CUDA_PEAK_FLOPS["H100"]["bf16"]
    key = peak_cache_key(torch.get_num_threads())
    cached = _read_cache(cache_file)
    if key not in cached:
        cached[key] = measure_cpu_matmul_peak()
        if cache_file is not None:
            with atomic_path(cache_file) as tmp:
                tmp.write_text(json.dumps(cached))
    return cached[key]


def peak_memory_gib(device: torch.device) -> float:
    """Peak device memory reserved (CUDA) or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss * 1024 / 2**30


def _read_cache(cache_file: Path | None) -> dict:
    """The measured peaks cached so far; empty when there is no cache or it is unreadable (measured again)."""
    try:
        cached = parse_json(cache_file.read_bytes()) if cache_file is not None and cache_file.exists() else {}
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}
