"""The run folder's metric sinks: metrics.jsonl (always), TensorBoard and Weights & Biases (optional).

Floats are written with Python's repr, which round-trips, so loss and grad norm in metrics.jsonl
are the exact fp32 values and two runs can be compared bitwise from their files. The file is strict
JSON: NaN and infinities (a skipped or ignored non-finite step) are written as the strings "NaN",
"Infinity" and "-Infinity", which any JSON reader accepts; ``json_floats`` turns them back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lockstep.config.sections import MetricsConfig


class MetricsLogger:
    def __init__(self, metrics: MetricsConfig, *, run_folder: Path, metrics_file: Path, run_name: str) -> None:
        self._file = open(metrics_file, "a")
        self._tensorboard = None
        self._wandb = None
        if metrics.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(run_folder / "tb"))
        if metrics.enable_wandb:
            import wandb

            self._wandb = wandb.init(project="lockstep", name=run_name, dir=str(run_folder))

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


NONFINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by its NONFINITE_STRINGS name (nested too), since
    bare NaN/Infinity tokens are not JSON and break strict readers (jq, JavaScript, pandas' ujson)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def json_floats(value: Any) -> Any:
    """The inverse of strict_json: the names back to float NaN and infinities (nested too)."""
    if isinstance(value, str):
        return NONFINITE_STRINGS.get(value, value)
    if isinstance(value, dict):
        return {k: json_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_floats(v) for v in value]
    return value
