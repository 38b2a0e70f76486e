"""lockstep.checkpoint.folders: step folders are never destroyed silently. Folders without manifests are an
error, not a fresh start; publishing never replaces a checkpoint unless allowed; pruning never deletes what
a step folder was not written with; and the checkpoint folder may not lie outside the run folder."""

import shutil

import pytest

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointError
from tests.checkpoint.helpers import _resume
from tests.helpers import tiny_config


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
    manifest = folders.read_manifest(partial) | {"step": 8}
    (partial / folders.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="exists already.*discard_newer"):
        folders.publish(partial, folders.step_folder(root, 8), manifest)
    folders.publish(partial, folders.step_folder(root, 8), manifest, replace=True)
    assert folders.problem_with(folders.step_folder(root, 8)) is None


def test_pruning_never_deletes_what_a_step_folder_was_not_written_with(run):
    root = run / "run" / "checkpoint"
    stranger = folders.step_folder(root, 4) / "notes.txt"  # e.g. someone's run folder put in there
    stranger.write_text("mine")
    folders.prune(root, 1)
    assert stranger.read_text() == "mine" and [s for s, _ in folders.published_steps(root)] == [4, 8]


def test_a_checkpoint_folder_outside_the_run_folder_is_refused(tmp_path):
    from lockstep.config import ConfigError, validate_job_config

    with pytest.raises(ConfigError, match="outside job.dump_folder"):
        validate_job_config(tiny_config(tmp_path, "--checkpoint.folder", "../shared-checkpoints"), world_size=1)
