"""Rank 0's writes at the start of a launch, together: the launch record (launches/NNN), the run
folder's latest config.toml and env.json (metrics.jsonl kept or rewound), and the metrics sinks. An
odd file where one of these belongs is one line naming it, not a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lockstep.config.sections import MetricsConfig
from lockstep.errors import InputError
from lockstep.run.folder import prepare_run_folder
from lockstep.run.launches import Launch, start_launch
from lockstep.run.metrics_file import MetricsLogger


def record_launch(
    run_folder: Path,
    *,
    config_toml: str,
    env: dict[str, Any],
    start_step: int,
    resumed_from: Path | None,
    resumed_at: int | None,
    metrics: MetricsConfig,
    log,
) -> tuple[Launch, MetricsLogger]:
    """Rank 0's writes at the start of a launch: launches/NNN, the latest config.toml and env.json,
    and the metrics sinks. An odd file where one of these belongs is one line naming it."""
    try:
        launch = start_launch(
            run_folder, config_toml=config_toml, env=env, start_step=start_step, resumed_from=resumed_from, log=log
        )
        metrics_file = prepare_run_folder(run_folder, config_toml, env, resumed_at=resumed_at)
        return launch, MetricsLogger(
            metrics, run_folder=run_folder, metrics_file=metrics_file, run_name=run_folder.name
        )
    except OSError as e:  # e.g. a file where launches/NNN or metrics.jsonl belongs
        raise InputError(
            e.filename or run_folder, f"cannot record this launch ({e.strerror})",
            "move the file or folder in the way out of the run folder",
        ) from e  # fmt: skip
