"""Before a CUDA run builds its model: will the layout fit the device it found? A layout that clearly
cannot (the estimate above the device's memory by more than ``MARGIN``) is refused in one line, with
its biggest term and a layout that fits; the borderline cases are left to the run."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from lockstep.config import JobConfig
from lockstep.config.errors import ConfigError
from lockstep.tools.estimate.advice import nearest_fitting
from lockstep.tools.estimate.devices import DEVICES, GIB, DeviceSpec
from lockstep.tools.estimate.estimate import Topology, estimate, fits_clearly_not
from lockstep.tools.estimate.report import MEMORY_NAMES
from lockstep.tools.estimate.trace import traceable

MARGIN = 0.1


def this_device(index: int) -> DeviceSpec:
    """The spec of the local CUDA device: its own memory, and the rates of the known kind it is."""
    properties = torch.cuda.get_device_properties(index)
    kind = "h200" if "H200" in properties.name else "h100"
    return replace(DEVICES[kind], name=properties.name, memory_gib=properties.total_memory / GIB)


def refuse_layouts_that_cannot_fit(config: JobConfig, world_size: int, device: DeviceSpec) -> None:
    """Raise ConfigError (one line) when the estimate is clearly above the device's memory. A layout the
    estimate cannot trace yet (a schedule with several stages per rank) is left to the run."""
    if not traceable(config.parallelism):
        return
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    topology = Topology(max(world_size // per_node, 1), min(per_node, world_size))
    result = estimate(config, topology, device)
    if not fits_clearly_not(result, MARGIN):
        return
    verdict = result.verdict
    fitting = [a for a in nearest_fitting(config, topology, device, result.config["vocab_size"]) if a["fits"]]
    fix = f"a layout that fits: {fitting[0]['change']} ({fitting[0]['peak_gib']:.1f} GiB)" if fitting else (
        "no one-setting change fits; see lockstep estimate"
    )  # fmt: skip
    raise ConfigError(
        "training.skip_memory_check",
        f"this layout needs about {verdict['peak_gib']:.1f} GiB per rank (stage {verdict['worst_stage']}) and "
        f"{device.name} has {device.memory_gib:.1f} GiB; the biggest term is "
        f"{MEMORY_NAMES[verdict['biggest_term']]} ({verdict['biggest_term_gib']:.1f} GiB); {fix}; "
        "lockstep estimate with the same arguments shows every term; --training.skip_memory_check runs it anyway",
    )
