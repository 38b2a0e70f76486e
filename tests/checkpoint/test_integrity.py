"""Checkpoints are verified by content and never destroyed silently: flipped bytes are caught by the
checksum while the checkpoint loads (each file by exactly one rank; resume falls back to the next
older one, which overwrites whatever the failed load wrote), old checkpoints without checksums still
load, and a newer or unloadable checkpoint is only deleted or overwritten with --checkpoint.discard_newer."""

import errno
import json
import shutil
from collections import defaultdict
from types import SimpleNamespace

import pytest
from torch.distributed.checkpoint.planner import LoadPlan

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointError
from lockstep.checkpoint.safe_reader import SafeFileSystemReader
from lockstep.cli import main as cli_main
from lockstep.errors import LockstepError
from lockstep.train.trainer import Trainer
from tests.checkpoint.conftest import EIGHT
from tests.checkpoint.crafting import flip_byte, flip_tensor_byte
from tests.checkpoint.helpers import CHECKPOINTED, assert_bitwise, result, train
from tests.distributed import run_on_ranks
from tests.helpers import tiny_config, tiny_overrides


def _resume(folder, *overrides: str) -> int:
    with Trainer(tiny_config(folder, *CHECKPOINTED, *EIGHT, *overrides), show_progress=False) as trainer:
        return trainer.state.step


def test_manifest_records_a_checksum_per_file(trained):
    manifest = folders.read_manifest(folders.step_folder(trained / "run" / "checkpoint", 8))
    assert manifest["format"] == 2 and manifest["checksum"] == "xxh3_128"
    assert set(manifest["checksums"]) == set(manifest["files"]) - {folders.MANIFEST}
    assert not list((trained / "run" / "checkpoint").rglob("*.xxh3"))  # no per-file sidecars


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


def test_a_flipped_tensor_byte_fails_the_load_and_the_older_checkpoint_leaves_no_trace(run, trained, tmp_path, capsys):
    """The byte is inside model.output.weight's data: sizes and items look intact, torch.load accepts
    it, and the failed load has written step 8's tensors before the checksum fails at the end of the
    file; the fallback to step 4 overwrites them, so the run equals one resumed from step 4."""
    root = run / "run" / "checkpoint"
    newest = folders.step_folder(root, 8)
    name = flip_tensor_byte(newest, "model.output.weight")
    assert folders.problem_with(newest) is None  # no second read before the load: caught while loading
    train(run, EIGHT)
    assert f"skipping damaged checkpoint {newest}: file {name} does not match its checksum" in capsys.readouterr().out
    assert (root / "step-00000008.unloadable").is_dir()
    reference = tmp_path / "reference"
    shutil.copytree(trained / "run", reference / "run")
    shutil.rmtree(folders.step_folder(reference / "run" / "checkpoint", 8))
    train(reference, EIGHT)
    assert_bitwise(result(run), result(reference))


@pytest.fixture(scope="module")
def fsdp_trained(tmp_path_factory):
    """Checkpoints at steps 4 and 8 written by FSDP 2 (one data file per rank)."""
    folder = tmp_path_factory.mktemp("fsdp")
    run_on_ranks(train, 2, folder, EIGHT)
    return folder


def test_each_file_is_verified_by_exactly_one_rank(fsdp_trained, tmp_path):
    folder = tmp_path / "step"
    shutil.copytree(folders.step_folder(fsdp_trained / "run" / "checkpoint", 8), folder)
    reader = SafeFileSystemReader(str(folder))
    reader.set_up_storage_reader(reader.read_metadata(), True)
    items = defaultdict(list)  # DCP's plan items, as far as the assignment looks at them
    for index, info in reader.storage_data.items():
        items[info.relative_path].append(SimpleNamespace(storage_index=index))
    zero, one = sorted(items)
    plans = [LoadPlan(items[zero] + items[one][:1]), LoadPlan(items[one][1:]), LoadPlan([])]  # 3 ranks read 2 files
    shares = [plan.storage_data for plan in reader.prepare_global_plan(plans)]
    assert [sorted(share) for share in shares] == [[zero], [one], []]  # the rank that reads most of it
    shares = [plan.storage_data for plan in reader.prepare_global_plan([LoadPlan([])] * 3)]  # nothing read
    assert sorted(name for share in shares for name in share) == [zero, one]  # hashed whole, once each
    manifest = folders.read_manifest(folder)
    assert {name: digest for share in shares for name, digest in share.items()} == {
        name: digest for name, digest in manifest["checksums"].items() if name != ".metadata"
    }
    manifest["checksums"][".metadata"] = "0" * 32
    (folder / folders.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="file .metadata does not match its checksum"):
        reader.prepare_global_plan(plans)


def _resumes_at_4(folder) -> None:
    assert _resume(folder) == 4


def test_a_mismatch_found_by_one_rank_fails_the_load_on_both(fsdp_trained, tmp_path):
    """Rank 1 reads most of its own file, so it alone verifies it; rank 0 learns of the mismatch
    through DCP's read step and falls back with it."""
    shutil.copytree(fsdp_trained / "run", tmp_path / "run")
    root = tmp_path / "run" / "checkpoint"
    flip_tensor_byte(folders.step_folder(root, 8), "model.output.weight", "__1_0.distcp")
    run_on_ranks(_resumes_at_4, 2, tmp_path)
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
    manifest = folders.read_manifest(partial) | {"step": 8}
    (partial / folders.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="exists already.*discard_newer"):
        folders.publish(partial, folders.step_folder(root, 8), manifest)
    folders.publish(partial, folders.step_folder(root, 8), manifest, replace=True)
    assert folders.problem_with(folders.step_folder(root, 8)) is None


def test_a_refused_resume_deletes_nothing(run):
    """The config check runs before --checkpoint.discard_newer deletes anything: a refused resume
    leaves every checkpoint in place."""
    root = run / "run" / "checkpoint"
    with pytest.raises(LockstepError, match="optimizer.lr"):
        _resume(run, "--checkpoint.load_step", "4", "--checkpoint.discard_newer", "--optimizer.lr", "0.5")
    assert [s for s, _ in folders.published_steps(root)] == [4, 8]


@pytest.mark.parametrize("damage", ["garbage metadata", "manifest not an object"])
def test_garbage_metadata_or_manifest_falls_back(run, capsys, damage):
    step_8 = folders.step_folder(run / "run" / "checkpoint", 8)
    if damage == "garbage metadata":  # a pickle that fails with KeyError (a missing memo entry), same size
        metadata = step_8 / ".metadata"
        metadata.write_bytes(b"\x80\x04h\x05." + b"\0" * (metadata.stat().st_size - 5))
    else:
        (step_8 / folders.MANIFEST).write_text("[1, 2, 3]")
    assert _resume(run) == 4
    assert "step-00000008" in capsys.readouterr().out


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


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(run, capsys, monkeypatch):
    """The file system refuses the step-12 save (ENOSPC from every write): one line naming the cut-short
    folder and step 8, still the newest complete checkpoint; nothing is published for step 12."""

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lockstep.checkpoint.checksums._HashingStream.write", full)
    code = cli_main(["train", "--config", "llama3_debug", *tiny_overrides(run), *CHECKPOINTED])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("lockstep train: error: ")]
    assert "step-00000012.partial" in line and "No space left on device" in line
    assert "step 8 is still the newest complete checkpoint" in line
    assert [s for s, f in folders.published_steps(run / "run" / "checkpoint") if folders.has_manifest(f)] == [4, 8]


def test_a_model_of_another_shape_is_one_line_even_with_ignore_mismatch(run, capsys):
    """ignore_mismatch and allow_config_change let a changed model through the identity checks; its
    tensors still cannot load. One line names the first missing tensor, and the healthy checkpoint is
    neither skipped as damaged nor set aside."""
    code = cli_main([
        "train", "--config", "llama3_debug", *tiny_overrides(run), *CHECKPOINTED, "--model.overrides.n_layers", "3",
        "--checkpoint.ignore_mismatch", "--checkpoint.allow_config_change",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("lockstep train: error: ")]
    assert "step-00000008 holds no model.layers.2." in line and "resume with the model it was saved with" in line
    assert [s for s, f in folders.published_steps(run / "run" / "checkpoint") if folders.has_manifest(f)] == [4, 8]
