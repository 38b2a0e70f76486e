"""A torchtitan run as one side of ``lockstep compare``: its console log, or its TensorBoard folder.

torchtitan logs each step as ``step: N  loss: L  grad_norm: G  memory: ...`` (colored on a terminal)
and writes the same values as TensorBoard scalars ``loss_metrics/global_avg_loss`` and ``grad_norm``.
The log rounds the loss to 5 decimals and the grad norm to 4, so a comparison with it needs a
tolerance; the TensorBoard scalars are the fp32 values, which compare to lockstep's exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

from lockstep.errors import InputError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*(\S+)\s+grad_norm:\s*(\S+)")
LOSS_TAG, GRAD_NORM_TAG = "loss_metrics/global_avg_loss", "grad_norm"


def is_torchtitan_log(text: str) -> bool:
    return _STEP.search(_ANSI.sub("", text)) is not None


def log_series(file: Path, text: str) -> dict[int, dict]:
    """step -> {step, loss, grad_norm} from a torchtitan console log (the last line of a step wins)."""
    series = {}
    for step, loss, grad_norm in _STEP.findall(_ANSI.sub("", text)):
        try:
            series[int(step)] = {"step": int(step), "loss": float(loss), "grad_norm": float(grad_norm)}
        except ValueError:
            raise InputError(file, f"step {step}: loss {loss!r} or grad_norm {grad_norm!r} is not a number") from None
    return series


def event_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


def tensorboard_series(folder: Path) -> dict[int, dict]:
    """step -> {step, loss, grad_norm} from the TensorBoard event files under `folder` (torchtitan's
    scalar names); every file is read, the newest value of a step wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[int, dict] = {}
    for file in event_files(folder):
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        tags = set(events.Tags().get("scalars", []))
        if LOSS_TAG not in tags:
            continue
        for event in events.Scalars(LOSS_TAG):
            series.setdefault(event.step, {"step": event.step})["loss"] = float(event.value)
        for event in events.Scalars(GRAD_NORM_TAG) if GRAD_NORM_TAG in tags else []:
            series.setdefault(event.step, {"step": event.step})["grad_norm"] = float(event.value)
    if not series:
        raise InputError(folder, f"its TensorBoard events hold no {LOSS_TAG} scalars", "give torchtitan's tb folder")
    return {step: record for step, record in series.items() if "loss" in record}
