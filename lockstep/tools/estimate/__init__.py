"""``lockstep estimate``: predicted per-rank memory and per-step communication of a layout at any world
size, from the trainer's own code run on fake tensors (``trace``), checked against real runs (``measure``)."""

from lockstep.tools.estimate.advice import nearest_fitting
from lockstep.tools.estimate.devices import DEVICES, DeviceSpec, device_spec
from lockstep.tools.estimate.estimate import Estimate, Topology, estimate, fits_clearly_not
from lockstep.tools.estimate.report import render

__all__ = [
    "DEVICES", "DeviceSpec", "Estimate", "Topology", "device_spec", "estimate", "fits_clearly_not",
    "nearest_fitting", "render",
]  # fmt: skip
