"""lockstep.checkpoint.checksums: every file of a checkpoint gets an xxh3-128 checksum as it is written, and
a load verifies each file exactly once (by the rank that reads most of it), so a flipped byte, even inside
a tensor's data, fails the load on every rank and the resume falls back to the older checkpoint; format 1
checkpoints, written before checksums, still load."""

import json
import shutil
from collections import defaultdict
from types import SimpleNamespace

import pytest
from torch.distributed.checkpoint.planner import LoadPlan

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointError
from lockstep.checkpoint.safe_reader import SafeFileSystemReader
from tests.checkpoint.conftest import EIGHT
from tests.checkpoint.crafting import flip_byte, flip_tensor_byte
from tests.checkpoint.helpers import _resume, assert_bitwise, result, train
from tests.distributed import run_on_ranks


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
