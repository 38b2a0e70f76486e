"""lockstep.checkpoint.manager: resume is bitwise: stopped at step k and restarted (any layout), every later
step equals the uninterrupted run's loss, grad norm and final weights. A resume never destroys newer
checkpoints without --checkpoint.discard_newer, falls back past an unreadable one, and a failed save or a
model of another shape is one line that keeps the last checkpoint."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointError
from lockstep.checkpoint.hf import read_model_weights
from lockstep.checkpoint.manager import CheckpointMismatch
from lockstep.checkpoint.safe_reader import SafeFileSystemReader
from lockstep.cli import main as cli_main
from lockstep.errors import LockstepError
from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.checkpoint.helpers import CHECKPOINTED, _resume, assert_bitwise, result, train
from tests.distributed import run_on_ranks
from tests.helpers import tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    train(folder, [])
    return result(folder)


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_one_process_resume_is_bitwise(tmp_path, uninterrupted, async_mode):
    overrides = ["--checkpoint.async_mode", async_mode]
    train(tmp_path, overrides, stop_at=6)  # saves at 4 and when stopping (6 or 7)
    stopped_at = read_metrics(tmp_path / "run")[-1]["step"]
    assert 6 <= stopped_at < 12
    assert [s for s, _ in folders.published_steps(tmp_path / "run" / "checkpoint")] == [4, stopped_at]
    train(tmp_path, overrides)
    assert_bitwise(result(tmp_path), uninterrupted)


def test_fsdp_checkpoint_resumes_bitwise_in_any_layout(tmp_path, uninterrupted):
    """Saved by FSDP 2 after step 4..5; continued by FSDP 2, by one process and by PP 2."""
    first = tmp_path / "first"
    first.mkdir()
    run_on_ranks(train, 2, first, [], 4, "first")
    continuations = {
        "fsdp2": (2, []),
        "one": (1, []),
        "pp2": (
            2,
            ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_microbatch_size", "2"],
        ),
    }
    for name, (world_size, layout) in continuations.items():
        folder = tmp_path / name
        shutil.copytree(first, folder)
        if world_size == 1:
            train(folder, layout)
        else:
            run_on_ranks(train, world_size, folder, layout)
        if name == "tp2":
            metrics, weights = result(folder)
            for (step, loss, _), (_, ref_loss, _) in zip(metrics, uninterrupted[0], strict=True):
                assert abs(loss - ref_loss) <= 1e-5 * ref_loss, step
            assert all(torch.allclose(weights[k], uninterrupted[1][k], rtol=1e-4, atol=1e-5) for k in weights)
        else:
            assert_bitwise(result(folder), uninterrupted)
        launch = json.loads((folder / "run" / "launches" / "002" / "launch.json").read_text())
        assert ("layout.dp_shard" in launch["changed_since_previous_launch"]) == (name != "fsdp2")  # recorded


def test_metrics_after_the_checkpoint_are_rewound(tmp_path):
    """Steps logged after the last checkpoint are recomputed on resume; their old records move aside."""
    train(tmp_path, ["--checkpoint.interval", "100", "--training.steps", "12"], stop_at=0)  # saves only at 12
    run = tmp_path / "run"
    shutil.rmtree(folders.step_folder(run / "checkpoint", 12))
    folders_left = folders.published_steps(run / "checkpoint")
    assert folders_left == []
    train(tmp_path, ["--checkpoint.interval", "4"], stop_at=5)
    resumed_from = folders.published_steps(run / "checkpoint")[-1][0]
    assert [m["step"] for m in read_metrics(run)] == list(range(1, resumed_from + 1))
    train(tmp_path, ["--checkpoint.interval", "4"])
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 13))
    assert (run / "metrics.1.jsonl").exists()  # the first, unrelated run is kept


def test_kill_9_at_random_moments_then_resume(tmp_path, uninterrupted):
    """Killed four times: three times at random moments after a save, once while a save is being
    written (a .partial folder exists and is left behind); the rerun command finishes bitwise."""
    args = ["--config", "llama3_debug", *tiny_overrides(tmp_path), *CHECKPOINTED, "--checkpoint.interval", "1"]
    command = [sys.executable, "-m", "lockstep.train", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    checkpoints = tmp_path / "run" / "checkpoint"
    killed_mid_save = False
    for delay in (0.05, "mid-save", 0.4, 0.13):
        before = folders.published_steps(checkpoints)
        for leftover in checkpoints.glob(f"*{folders.PARTIAL}"):  # (the next save would prune it anyway)
            shutil.rmtree(leftover)
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        if delay == "mid-save":
            while not list(checkpoints.glob(f"*{folders.PARTIAL}")) and process.poll() is None:
                time.sleep(0.0005)  # a save has begun: kill it now
        else:
            while folders.published_steps(checkpoints) == before and process.poll() is None:
                time.sleep(0.01)  # wait for this attempt's first save, then kill it a moment later
            time.sleep(delay)
        assert time.time() < deadline
        process.send_signal(signal.SIGKILL)
        process.wait()
        if delay == "mid-save":
            killed_mid_save = bool(list(checkpoints.glob(f"*{folders.PARTIAL}")))
    assert killed_mid_save, "the kill did not land inside a save"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    metrics = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / "run")]
    assert metrics == uninterrupted[0]
    assert not list(checkpoints.glob(f"*{folders.PARTIAL}"))  # leftovers of killed saves are cleaned


def test_partial_and_damaged_checkpoints_are_never_loaded(tmp_path):
    train(tmp_path, ["--training.steps", "8"])
    root = tmp_path / "run" / "checkpoint"
    assert [s for s, _ in folders.published_steps(root)] == [4, 8]
    folders.partial_folder(root, 12).mkdir()  # an interrupted save: ignored
    damaged = next(folders.step_folder(root, 8).glob("*.distcp"))
    damaged.write_bytes(damaged.read_bytes()[:-10])  # truncated after publishing
    warnings = []
    assert folders.find_checkpoint(root, -1, warnings.append) == folders.step_folder(root, 4)
    assert "skipping damaged checkpoint" in warnings[0] and "bytes" in warnings[0]
    with pytest.raises(ValueError, match="damaged"):
        folders.find_checkpoint(root, 8, warnings.append)
    with pytest.raises(CheckpointError, match="published steps: 4, 8"):
        folders.find_checkpoint(root, 5, warnings.append)


def test_resuming_another_setup_is_refused(tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("one document about cats.\n" * 400)
    dataset = ["--training.dataset", "text", "--training.dataset_path", str(data), "--training.steps", "4"]
    train(tmp_path, dataset)
    data.write_text("another text entirely, about dogs.\n" * 400)
    with pytest.raises(CheckpointMismatch, match="fingerprints.*ignore_mismatch"):
        Trainer(tiny_config(tmp_path, *CHECKPOINTED, *dataset), show_progress=False)
    with pytest.raises(CheckpointMismatch, match="model"):
        Trainer(tiny_config(tmp_path, *CHECKPOINTED, *dataset, "--model.flavor", "debug"), show_progress=False)
    trainer = Trainer(tiny_config(tmp_path, *CHECKPOINTED, *dataset, "--checkpoint.ignore_mismatch"))
    assert trainer.state.step == 4


def test_seed_checkpoint_starts_every_layout(tmp_path, uninterrupted):
    seed_run = ["--checkpoint.create_seed_checkpoint"]
    with Trainer(tiny_config(tmp_path, *CHECKPOINTED, *seed_run), show_progress=False) as trainer:
        trainer.train()
    step0 = folders.step_folder(tmp_path / "run" / "checkpoint", 0)
    assert json.loads((step0 / folders.MANIFEST).read_text())["model_only"] is True
    run_on_ranks(train, 2, tmp_path, [])  # FSDP 2 starts from the seed weights
    assert_bitwise(result(tmp_path), uninterrupted)


def write_seed_checkpoint(folder) -> None:
    """Write the seed checkpoint of the CHECKPOINTED run into folder/run, in this process's layout."""
    with Trainer(tiny_config(folder, *CHECKPOINTED, "--checkpoint.create_seed_checkpoint"), show_progress=False) as t:
        t.train()


def test_fsdp_seed_checkpoint_equals_one_process_seed(tmp_path, uninterrupted):
    """A seed checkpoint written by FSDP 2 (each rank its shards) holds the one-process weights, bitwise,
    and a one-process run started from it is the uninterrupted run."""
    (tmp_path / "fsdp").mkdir()
    run_on_ranks(write_seed_checkpoint, 2, tmp_path / "fsdp")
    write_seed_checkpoint(tmp_path / "one")
    seeds = [folders.step_folder(tmp_path / side / "run" / "checkpoint", 0) for side in ("fsdp", "one")]
    assert folders.read_manifest(seeds[0])["layout"] != folders.read_manifest(seeds[1])["layout"]
    sharded, whole = (read_model_weights(seed) for seed in seeds)
    assert sharded.keys() == whole.keys()
    assert all(torch.equal(sharded[k], whole[k]) for k in whole)
    train(tmp_path / "fsdp", [])
    assert_bitwise(result(tmp_path / "fsdp"), uninterrupted)


def test_keep_latest_k(tmp_path):
    train(tmp_path, ["--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "2"])
    assert [s for s, _ in folders.published_steps(tmp_path / "run" / "checkpoint")] == [10, 12]


def test_last_save_model_only_in_bf16(tmp_path):
    train(tmp_path, ["--training.steps", "6", "--checkpoint.last_save_model_only", "--checkpoint.export_dtype", "bf16"])
    root = tmp_path / "run" / "checkpoint"
    manifest = folders.read_manifest(folders.step_folder(root, 6))
    assert manifest["model_only"] is True and manifest["parts"] == ["model"]
    assert not folders.read_manifest(folders.step_folder(root, 4))["model_only"]

    metadata = SafeFileSystemReader(str(folders.step_folder(root, 6))).read_metadata().state_dict_metadata
    assert metadata["model.output.weight"].properties.dtype == torch.bfloat16
    assert not any(k.startswith("optimizer") for k in metadata)
    with Trainer(tiny_config(tmp_path, *CHECKPOINTED, "--training.steps", "6"), show_progress=False) as trainer:
        assert trainer.state.step == 4  # a rerun resumes from the newest full checkpoint


def test_exclude_from_loading_skips_a_part(tmp_path, uninterrupted):
    """Resuming without the optimizer state starts AdamW afresh: the steps after the checkpoint change."""
    train(tmp_path, [], stop_at=4)
    stopped = folders.published_steps(tmp_path / "run" / "checkpoint")[-1][0]
    train(tmp_path, ["--checkpoint.exclude_from_loading", "optimizer"])
    metrics, _ = result(tmp_path)
    assert [m[0] for m in metrics] == list(range(1, 13))
    assert metrics[:stopped] == uninterrupted[0][:stopped]
    assert metrics[stopped][1] == uninterrupted[0][stopped][1]  # same weights and data for the next forward
    assert metrics[stopped + 1 :] != uninterrupted[0][stopped + 1 :]  # but fresh AdamW moments after it


def test_a_checkpoint_of_the_previous_sample_order_is_refused_unless_asked(tmp_path, monkeypatch):
    """A checkpoint written before the sample order was versioned (order 1, a stored permutation) would
    resume onto other windows: refused in one line, and resumed with --checkpoint.ignore_mismatch."""
    from lockstep.data.loader import DataLoader
    from lockstep.errors import LockstepError

    current = DataLoader.state_dict
    monkeypatch.setattr(
        DataLoader, "state_dict", lambda self: {k: v for k, v in current(self).items() if k != "order_version"}
    )
    checkpointed = ["--checkpoint.enable", "--checkpoint.interval", "2"]
    with Trainer(tiny_config(tmp_path, *checkpointed, "--training.steps", "2"), show_progress=False) as trainer:
        trainer.train()
    monkeypatch.setattr(DataLoader, "state_dict", current)
    with pytest.raises(LockstepError, match="written with sample order 1"):
        Trainer(tiny_config(tmp_path, *checkpointed, "--training.steps", "4"), show_progress=False)
    config = tiny_config(tmp_path, *checkpointed, "--training.steps", "4", "--checkpoint.ignore_mismatch")
    with Trainer(config, show_progress=False) as trainer:
        assert trainer.state.step == 2
        trainer.train()


def test_a_resume_draws_no_initial_weights_unless_the_model_is_not_loaded(tmp_path, monkeypatch):
    """Resuming fills no parameter before the checkpoint overwrites it; with the model excluded from
    loading, the parameters get the run's initial values (the seed's, bitwise), not leftover memory."""
    from lockstep.models.common import init as init_fns

    drawn = []
    original = init_fns.initialize_parameters
    monkeypatch.setattr(init_fns, "initialize_parameters", lambda *a, **k: drawn.append(1) or original(*a, **k))
    checkpointed = ["--checkpoint.enable", "--checkpoint.interval", "2", "--training.steps", "2"]
    with Trainer(tiny_config(tmp_path, *checkpointed), show_progress=False) as trainer:
        initial = {n: p.detach().clone() for n, p in trainer.named_params}
        trainer.train()
    assert len(drawn) == 1
    with Trainer(tiny_config(tmp_path, *checkpointed), show_progress=False) as trainer:
        assert trainer.state.step == 2 and len(drawn) == 1
        trained = {n: p.detach().clone() for n, p in trainer.named_params}
    assert any(not torch.equal(trained[n], initial[n]) for n in initial)
    excluded = [*checkpointed, "--checkpoint.exclude_from_loading", "model"]
    with Trainer(tiny_config(tmp_path, *excluded), show_progress=False) as trainer:
        assert trainer.state.step == 2 and len(drawn) == 2
        assert all(torch.equal(p, initial[n]) for n, p in trainer.named_params)


def test_an_older_load_step_never_overwrites_newer_checkpoints(run, capsys):
    root = run / "run" / "checkpoint"
    with pytest.raises(CheckpointError, match=r"newer .*\(steps 8\).*--checkpoint.discard_newer"):
        _resume(run, "--checkpoint.load_step", "4")
    assert [s for s, _ in folders.published_steps(root)] == [4, 8]
    assert _resume(run, "--checkpoint.load_step", "4", "--checkpoint.discard_newer") == 4
    assert "discarding checkpoints 8" in capsys.readouterr().out
    assert [s for s, _ in folders.published_steps(root)] == [4]


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
