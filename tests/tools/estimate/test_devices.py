"""lockstep.tools.estimate.devices: ``device_spec`` replaces only the fields given (a None override, as
argparse passes for an absent flag, keeps the device's own value; one --peak-tflops applies to every
compute dtype) and never alters the shared table, and the "cpu" device is this machine's physical
memory. This matters because `lockstep estimate` builds its verdict from these figures: an absent flag
that zeroed a bandwidth, an override that leaked into the next estimate through the module-level table,
or a peak kept for one dtype only would give a wrong fit or step time with no error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lockstep.tools.estimate.devices import DEVICES, GIB, DeviceSpec, device_spec


def test_absent_overrides_keep_the_devices_own_values():
    for name, spec in DEVICES.items():
        assert spec.name == name
        none = dict.fromkeys(["memory_gib", "peak_tflops", "hbm_gbps", "intra_node_gbps", "inter_node_gbps"])
        assert device_spec(name, **none) == spec


def test_each_override_replaces_its_field_only_and_leaves_the_table_alone():
    before = {name: dataclasses.replace(spec, peak_tflops=dict(spec.peak_tflops)) for name, spec in DEVICES.items()}
    base = DEVICES["h100"]
    fields = {"memory_gib": 40.5, "hbm_gbps": 1234.0, "intra_node_gbps": 77.0, "inter_node_gbps": 3.25}
    for field, value in fields.items():
        spec = device_spec("h100", **{field: value})
        assert getattr(spec, field) == value
        assert dataclasses.replace(spec, **{field: getattr(base, field)}) == base
    peak = device_spec("h100", peak_tflops=123.0)
    assert peak.peak_tflops == dict.fromkeys(base.peak_tflops, 123.0)  # every compute dtype
    assert dataclasses.replace(peak, peak_tflops=base.peak_tflops) == base
    assert DEVICES == before


def test_h200_is_the_h100_with_more_and_faster_memory():
    h100, h200 = DEVICES["h100"], DEVICES["h200"]
    same = [f.name for f in dataclasses.fields(DeviceSpec) if f.name not in ("name", "memory_gib", "hbm_gbps")]
    assert all(getattr(h100, f) == getattr(h200, f) for f in same)
    assert h200.memory_gib > h100.memory_gib and h200.hbm_gbps > h100.hbm_gbps


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="reads Linux's /proc/meminfo")
def test_cpu_device_is_this_machines_physical_memory():
    total_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    spec = device_spec("cpu")
    assert spec.memory_gib == pytest.approx(total_kib * 1024 / GIB, rel=1e-6)
    assert device_spec("cpu", memory_gib=0.25).memory_gib == 0.25
    assert set(spec.peak_tflops) == set(DEVICES["h100"].peak_tflops)  # the estimate looks up the same dtypes
