"""The accelerators an estimate is made for: memory, peak matmul rate, memory and link bandwidths."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

GIB = 2**30


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_gib: float
    """What torch can allocate on one device (torch.cuda.get_device_properties().total_memory)."""
    peak_tflops: dict[str, float]
    """Dense matmul peak by compute dtype (fp32 is plain FP32: lockstep does not enable TF32)."""
    hbm_gbps: float
    intra_node_gbps: float
    """Per device, one direction, inside a node (NVLink)."""
    inter_node_gbps: float
    """Per device, one direction, between nodes (its network rail)."""
    fixed_overhead_gib: float
    """CUDA context, cuBLAS workspaces and NCCL's channel buffers: outside PyTorch's allocator."""
    fragmentation: float
    """Margin on the allocator's peak for the caching allocator's fragmentation."""


DEVICES = {
    # H100 SXM5 80GB: 989 dense BF16 TFLOP/s, 67 FP32, 3.35 TB/s HBM3, NVLink 4 (450 GB/s each way),
    # one 400 Gb/s NDR rail per GPU.
    "h100": DeviceSpec("h100", 79.1, {"bf16": 989.0, "fp32": 67.0}, 3350.0, 450.0, 50.0, 1.5, 0.05),
    # H200 SXM 141GB: the H100's compute with 4.8 TB/s HBM3e.
    "h200": DeviceSpec("h200", 139.8, {"bf16": 989.0, "fp32": 67.0}, 4800.0, 450.0, 50.0, 1.5, 0.05),
}


def cpu_spec() -> DeviceSpec:
    """This machine as a device: its memory, a CPU's matmul rate and loopback as the links."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return DeviceSpec("cpu", memory, {"bf16": 0.05, "fp32": 0.15}, 20.0, 5.0, 1.0, 0.0, 0.0)


def device_spec(name: str, **overrides: float | None) -> DeviceSpec:
    """A named device with any of memory_gib, peak_tflops (the compute dtype's), hbm_gbps,
    intra_node_gbps and inter_node_gbps replaced."""
    spec = cpu_spec() if name == "cpu" else DEVICES[name]
    given = {k: v for k, v in overrides.items() if v is not None}
    if "peak_tflops" in given:
        peak = given.pop("peak_tflops")
        given["peak_tflops"] = {"bf16": peak, "fp32": peak}
    return replace(spec, **given)
