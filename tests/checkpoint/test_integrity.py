"""Checkpoints are verified by content and never destroyed silently: flipped bytes are caught by the
checksum (resume falls back), old checkpoints without checksums still load, and a newer or
unloadable checkpoint is only deleted or overwritten with --checkpoint.discard_newer."""

import json
import shutil

import pytest

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointError
from lockstep.train.trainer import Trainer
from tests.checkpoint.crafting import flip_byte
from tests.checkpoint.helpers import CHECKPOINTED, train
from tests.helpers import tiny_config

EIGHT = ["--training.steps", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    train(folder, EIGHT)
    return folder


@pytest.fixture
def run(tmp_path, trained):
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path


def _resume(folder, *overrides: str) -> int:
    with Trainer(tiny_config(folder, *CHECKPOINTED, *EIGHT, *overrides), show_progress=False) as trainer:
        return trainer.state.step


def test_manifest_records_a_checksum_per_file(trained):
    manifest = folders.read_manifest(folders.step_folder(trained / "run" / "checkpoint", 8))
    assert manifest["format"] == 2 and manifest["checksum"] == "xxh3_128"
    assert set(manifest["checksums"]) == set(manifest["files"]) - {folders.MANIFEST}
    assert not list((trained / "run" / "checkpoint").rglob("*.xxh3"))  # sidecars folded in


def test_same_size_corruption_falls_back_with_a_message(run, capsys):
    root = run / "run" / "checkpoint"
    name = flip_byte(folders.step_folder(root, 8))
    with pytest.raises(CheckpointError, match=f"{name} does not match its checksum") as error:
        _resume(run, "--checkpoint.load_step", "8")
    assert "\n" not in str(error.value)
    assert _resume(run) == 4
    out = capsys.readouterr().out
    assert f"skipping damaged checkpoint {folders.step_folder(root, 8)}: file {name} does not match" in out
    assert [s for s, _ in folders.published_steps(root)] == [4]
    assert (root / "step-00000008.unloadable").is_dir()


def test_format_1_checkpoints_without_checksums_still_load(run):
    root = run / "run" / "checkpoint"
    for step in (4, 8):
        manifest_path = folders.step_folder(root, step) / folders.MANIFEST
        manifest = json.loads(manifest_path.read_text())
        manifest = {k: v for k, v in manifest.items() if k not in ("checksums", "checksum")} | {"format": 1}
        manifest_path.write_text(json.dumps(manifest))
    assert _resume(run) == 8


def test_an_older_load_step_never_overwrites_newer_checkpoints(run, capsys):
    root = run / "run" / "checkpoint"
    with pytest.raises(CheckpointError, match=r"newer .*\(steps 8\).*--checkpoint.discard_newer"):
        _resume(run, "--checkpoint.load_step", "4")
    assert [s for s, _ in folders.published_steps(root)] == [4, 8]
    assert _resume(run, "--checkpoint.load_step", "4", "--checkpoint.discard_newer") == 4
    assert "discarding checkpoints 8" in capsys.readouterr().out
    assert [s for s, _ in folders.published_steps(root)] == [4]


def test_folders_without_manifests_are_an_error_not_a_fresh_start(run):
    root = run / "run" / "checkpoint"
    for step in (4, 8):
        (folders.step_folder(root, step) / folders.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"steps 4, 8\).*fresh start.*discard_newer"):
        _resume(run)
    folders.prune(root, 1)  # never pruned either
    assert [s for s, _ in folders.published_steps(root)] == [4, 8]


def test_publish_never_replaces_a_checkpoint_unless_allowed(run):
    root = run / "run" / "checkpoint"
    partial = folders.partial_folder(root, 8)
    shutil.copytree(folders.step_folder(root, 4), partial)
    (partial / folders.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="exists already.*discard_newer"):
        folders.publish(partial, folders.step_folder(root, 8), {"step": 8})
    folders.publish(partial, folders.step_folder(root, 8), {"step": 8}, replace=True)
    assert folders.problem_with(folders.step_folder(root, 8)) is None
