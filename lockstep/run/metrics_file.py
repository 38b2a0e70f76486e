"""The run folder's metric sinks: metrics.jsonl (always), TensorBoard and Weights & Biases (optional).

Floats are written with Python's repr, which round-trips, so loss and grad norm in metrics.jsonl
are the exact fp32 values and two runs can be compared bitwise from their files. The file is strict
JSON: NaN and infinities (a skipped or ignored non-finite step) are written as the strings "NaN",
"Infinity" and "-Infinity", which any JSON reader accepts; ``json_floats`` turns them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lockstep.config.sections import MetricsConfig
from lockstep.run.jsonl import JsonlWriter


class MetricsLogger:
    def __init__(self, metrics: MetricsConfig, *, run_folder: Path, metrics_file: Path, run_name: str) -> None:
        self._file = JsonlWriter(metrics_file, strict=True, keep_open=True)
        self._tensorboard = None
        self._wandb = None
        if metrics.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(run_folder / "tb"))
        if metrics.enable_wandb:
            import wandb

            self._wandb = wandb.init(project="lockstep", name=run_name, dir=str(run_folder))

    def log(self, record: dict[str, Any]) -> None:
        self._file.append(record)
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
