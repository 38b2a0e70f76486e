"""The resume policy, with no trainer: which keys change the numbers, the refusal and its override,
where the resumed config is read from, the seed a resumed run keeps, and what replica groups share."""

import json

import pytest

from lockstep.checkpoint import folders
from lockstep.config.sections import CheckpointConfig
from lockstep.run.resume import (
    ConfigChangeError,
    changes_the_numbers,
    check_config_change,
    config_record,
    resumed_config,
    resumed_seed,
    shared_settings,
)


@pytest.mark.parametrize(
    ("key", "changes"),
    [
        ("model.flavor", True), ("optimizer.lr", True), ("debug.seed", True), ("training.global_batch_size", True),
        ("training.steps", False), ("training.device", False), ("data.cache_folder", False),
        ("metrics.log_freq", False), ("parallelism.tensor_parallel_degree", False), ("debug.fingerprint", False),
    ],
)  # fmt: skip
def test_which_keys_change_the_numbers(key, changes):
    assert changes_the_numbers(key) is changes


def test_a_change_of_the_numbers_is_refused_naming_only_its_keys(tmp_path):
    old = {"optimizer": {"lr": 1e-3}, "training": {"steps": 10}, "metrics": {"log_freq": 1}}
    new = {"optimizer": {"lr": 2e-3}, "training": {"steps": 20}, "metrics": {"log_freq": 5}}
    with pytest.raises(ConfigChangeError, match=r"optimizer\.lr: 0\.001 -> 0\.002") as refused:
        check_config_change(
            old, new, allow=False, checkpoint=tmp_path / "step-1", source="the checkpoint's manifest", log=print
        )
    assert "training.steps" not in str(refused.value) and "log_freq" not in str(refused.value)


def test_allowed_changes_are_returned_and_logged(tmp_path):
    lines = []
    old, new = {"optimizer": {"lr": 1e-3}}, {"optimizer": {"lr": 2e-3}}
    assert check_config_change(old, new, allow=True, checkpoint=tmp_path, source="x", log=lines.append) == {
        "optimizer.lr": (1e-3, 2e-3)
    }
    assert len(lines) == 1 and "optimizer.lr" in lines[0]
    assert (
        check_config_change(None, new, allow=False, checkpoint=tmp_path, source="x", log=lines.append) == {}
    )  # nothing to compare with
    assert (
        check_config_change({"optimizer": {}}, new, allow=False, checkpoint=tmp_path, source="x", log=lines.append)
        == {}
    )  # a new key


def test_the_resumed_config_is_the_manifests_else_the_previous_launchs(tmp_path):
    assert resumed_config({"config": {"a": 1}}, tmp_path) == ({"a": 1}, "the checkpoint's manifest")
    (tmp_path / "config.toml").write_text("[training]\nglobal_batch_size = -1\nsteps = 3\n")
    previous, source = resumed_config({}, tmp_path)
    assert previous == {"training": {"steps": 3}} and source == "the previous launch's config.toml"
    assert resumed_config({}, tmp_path / "nothing") == (None, "the previous launch's config.toml")


def test_config_record_holds_the_resolved_batch():
    record = config_record("[training]\nglobal_batch_size = -1\n", global_batch=16)
    assert record == {"training": {"global_batch_size": 16}}


def _publish(run, step: int, manifest: dict) -> None:
    folder = folders.step_folder(run / "checkpoint", step)
    folder.mkdir(parents=True)
    (folder / folders.MANIFEST).write_text(json.dumps(manifest))


def test_a_resumed_run_keeps_the_seed_of_its_newest_checkpoint(tmp_path):
    checkpoint = CheckpointConfig(enable=True)
    assert resumed_seed(checkpoint, tmp_path) is None  # nothing to resume
    _publish(tmp_path, 1, {"config": {"debug": {"seed": 5}}})
    _publish(tmp_path, 2, {"config": {"debug": {"seed": 6}}})
    assert resumed_seed(checkpoint, tmp_path) == 6
    _publish(tmp_path, 3, {})  # a manifest without the config record: the newest one with it
    assert resumed_seed(checkpoint, tmp_path) == 6
    assert resumed_seed(CheckpointConfig(enable=False), tmp_path) is None


def test_shared_settings_name_what_replica_groups_must_run_alike():
    identity = {
        "model": {"name": "llama3"}, "fingerprints": {"dataset": "d"}, "layout": {"dp": 2},
        "config": {"optimizer": {"lr": 1.0}, "training": {"steps": 4}, "metrics": {"log_freq": 1}},
    }  # fmt: skip
    shared = shared_settings(identity)
    assert shared == {
        "model": {"name": "llama3"}, "data": {"dataset": "d"}, "layout": {"dp": 2},
        "optimizer.lr": 1.0, "training.steps": 4,
    }  # fmt: skip
