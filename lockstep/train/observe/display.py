"""The console: one line per logged record, and a progress bar on a terminal."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_record(record: dict[str, Any]) -> str:
    line = (
        f"step {record['step']:>6}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.4f}  "
        f"lr {record['lr']:.2e}  tok/s {record['tokens_per_sec']:,.0f}  mfu {record['mfu']:.1f}%  "
        f"mem {record['memory_gib']:.2f} GiB"
    )
    if "val_loss" in record:
        line += f"  val_loss {record['val_loss']:.4f}  val_ppl {record['val_ppl']:.2f}"
    load_cvs = [v for k, v in record.items() if k.startswith("moe/") and k.endswith("/load_cv")]
    if load_cvs:  # one summary of expert balance: the worst layer's coefficient of variation
        line += f"  expert load cv max {max(load_cvs):.2f}"
    return line


class ConsoleDisplay:
    """A live progress bar on a terminal; plain log lines otherwise (CI, files). Only rank 0 shows it."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(soft_wrap=True)
        self._progress = None
        if enabled and sys.stdout.isatty():
            self._progress = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, loss="-")
            self._progress.start()

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, markup=False)

    def step(self, step: int, loss: float | None) -> None:
        if self._progress is not None:
            fields = {"loss": f"{loss:.4f}"} if loss is not None else {}
            self._progress.update(self._task, completed=step, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
