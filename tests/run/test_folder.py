"""The run folder: what a fresh or resumed launch does to an earlier metrics.jsonl (kept under a number,
or rewound), files written by replacement so a link is never written through, and read_metrics."""

import json
import math
import platform

import pytest
import torch

from lockstep.errors import InputError
from lockstep.run.folder import (
    environment,
    environment_differences,
    plain_or_absent,
    prepare_run_folder,
    read_metrics,
)


def _lines(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in steps)


def test_a_fresh_run_writes_its_config_and_env_and_starts_an_empty_metrics_file(tmp_path):
    folder = tmp_path / "new" / "run"
    metrics = prepare_run_folder(folder, "a = 1\n", {"seeds": {"root": 3}})
    assert metrics == folder / "metrics.jsonl" and not metrics.exists()
    assert (folder / "config.toml").read_text() == "a = 1\n"
    assert json.loads((folder / "env.json").read_text()) == {"seeds": {"root": 3}}


def test_a_fresh_run_keeps_each_earlier_runs_metrics_under_the_next_free_number(tmp_path):
    for steps in ((1, 2), (1, 2, 3)):
        (tmp_path / "metrics.jsonl").write_text(_lines(*steps))
        prepare_run_folder(tmp_path, "", {})
    assert not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "metrics.1.jsonl").read_text() == _lines(1, 2)
    assert (tmp_path / "metrics.2.jsonl").read_text() == _lines(1, 2, 3)


def test_a_resumed_run_keeps_the_steps_up_to_its_checkpoint_and_moves_the_later_ones_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_lines(1, 2, 3, 4))
    metrics = prepare_run_folder(tmp_path, "", {}, resumed_at=2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2] and metrics.read_text() == _lines(1, 2)
    assert (tmp_path / "metrics.rewound.jsonl").read_text() == _lines(3, 4)
    assert not (tmp_path / "metrics.1.jsonl").exists()  # resumed: nothing is numbered away


def test_config_and_env_replace_a_link_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.toml"
    outside.write_text("kept")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").symlink_to(outside)
    prepare_run_folder(run, "b = 2\n", {})
    assert outside.read_text() == "kept"
    assert not (run / "config.toml").is_symlink() and (run / "config.toml").read_text() == "b = 2\n"


@pytest.mark.parametrize("name", ["metrics.jsonl", "metrics.rewound.jsonl"])
def test_a_linked_metrics_file_is_refused_and_its_target_untouched(tmp_path, name):
    outside = tmp_path / "outside.jsonl"
    outside.write_text(_lines(1))
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(outside)
    with pytest.raises(InputError, match="is not a plain file"):
        prepare_run_folder(run, "", {}, resumed_at=0)
    assert outside.read_text() == _lines(1)


def test_plain_or_absent_accepts_a_plain_file_or_nothing_and_refuses_a_folder(tmp_path):
    plain_or_absent(tmp_path / "absent.jsonl")
    (tmp_path / "plain.jsonl").write_text("")
    plain_or_absent(tmp_path / "plain.jsonl")
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(InputError, match="folder.jsonl"):
        plain_or_absent(tmp_path / "folder.jsonl")


def test_read_metrics_turns_strict_and_bare_non_finite_values_back_into_floats(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": "NaN", "g": "-Infinity"}\n\n{"step": 2, "loss": NaN}\n'
    )
    first, second = read_metrics(tmp_path)
    assert math.isnan(first["loss"]) and first["g"] == -math.inf and math.isnan(second["loss"])


def test_read_metrics_names_the_line_that_is_not_json(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_lines(1) + "{torn\n")
    with pytest.raises(InputError, match=r"metrics.jsonl:line 2: "):
        read_metrics(tmp_path)


def test_this_machines_own_environment_shows_no_differences():
    env = environment(torch.device("cpu"), 1, {"root": 1}, {"data": "x"})
    assert environment_differences(env) == []


def test_environment_differences_name_a_changed_package_revision_and_host():
    env = environment(torch.device("cpu"), 1, {}, {})
    env["versions"]["torch"] = "0.0.1"
    env["versions"]["python"] = platform.python_version()  # unchanged: not listed
    env["git"] = {"revision": "f" * 40, "dirty": True}
    env["host"] = "another-host"
    found = environment_differences(env)
    assert len(found) == 3
    assert found[0].startswith("torch 0.0.1 in the run, ") and found[0].endswith(f"{torch.__version__} here")
    assert found[1].startswith("lockstep git revision ffffffffffff (dirty) in the run")
    assert found[2].startswith("host another-host in the run")
