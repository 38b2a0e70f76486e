"""record_launch, with no trainer: a launch's record, the run folder's files and the metrics sinks,
and one line naming an odd file in the way."""

import json

import pytest

from lockstep.config.sections import MetricsConfig
from lockstep.errors import InputError
from lockstep.run.start import record_launch


def _record(run, lines):
    return record_launch(
        run, config_toml="[training]\nsteps = 2\n", env={"world_size": 1}, start_step=0, resumed_from=None,
        resumed_at=None, metrics=MetricsConfig(), log=lines.append,
    )  # fmt: skip


def test_a_launch_is_recorded_and_its_metrics_file_opened(tmp_path):
    lines: list[str] = []
    launch, metrics = _record(tmp_path / "run", lines)
    metrics.log({"step": 1, "loss": 2.0})
    metrics.close()
    assert lines == ["launch 1 (fresh start)"]
    assert json.loads((tmp_path / "run" / "launches" / "001" / "launch.json").read_text())["start_step"] == 0
    assert (tmp_path / "run" / "config.toml").read_text() == "[training]\nsteps = 2\n"
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    assert launch.folder == tmp_path / "run" / "launches" / "001"


def test_a_file_where_the_launches_folder_belongs_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "launches").write_text("in the way")
    with pytest.raises(InputError, match="launches"):
        _record(tmp_path / "run", [])
