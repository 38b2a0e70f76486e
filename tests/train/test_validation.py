"""In-loop validation: an exact held-out loss, the same bits in every data-parallel and pipeline layout,
and no trace on the training run it measures."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lockstep.config.errors import ConfigError
from lockstep.data.dataset import IGNORE_INDEX
from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.distributed import run_in_folder
from tests.helpers import merged_rank_weights, save_rank_weights, tiny_config

# 4 training steps of 8 samples; an evaluation after steps 2 and 4 of 2 global batches of 8 windows.
BATCH = ["--training.steps", "4", "--training.global_batch_size", "8", "--training.local_batch_size", "2"]
VALIDATION = [
    "--validation.enable", "--validation.freq", "2", "--validation.steps", "2",
    "--validation.global_batch_size", "8", "--validation.local_batch_size", "2",
]  # fmt: skip
DETERMINISTIC = [*BATCH, "--debug.deterministic", "--debug.deterministic_chunks", "2"]
PIPELINE = [
    "--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule", "1F1B",
    "--parallelism.pipeline_parallel_microbatch_size", "2",
]  # fmt: skip
FULL_AC = ["--activation_checkpoint.mode", "full"]


def _train(folder, overrides: list[str]) -> None:
    with Trainer(tiny_config(folder, *overrides), show_progress=False) as trainer:
        trainer.train()
        save_rank_weights(trainer, folder)


def _run(folder, world_size: int, overrides: list[str]):
    run_in_folder(_train, world_size, folder, overrides)
    return read_metrics(folder / "run"), merged_rank_weights(folder)


def _training_view(records):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records]


def _validation_view(records):
    return [(r["step"], r["val_loss"], r["val_ppl"], r["val_tokens"]) for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one"), 1, [*DETERMINISTIC, *VALIDATION])


@pytest.mark.parametrize(
    "world_size, layout",
    [
        (2, ["--parallelism.data_parallel_replicate_degree", "2"]),
        (2, []),
        (4, ["--parallelism.data_parallel_replicate_degree", "2"]),
        (2, PIPELINE),
    ],
    ids=["ddp2", "fsdp2", "hsdp2x2", "pp2"],
)
def test_val_loss_is_bitwise_identical_across_layouts(tmp_path, one_process, world_size, layout):
    records, _ = _run(tmp_path, world_size, [*DETERMINISTIC, *VALIDATION, *layout])
    assert _validation_view(records) == _validation_view(one_process[0])
    assert [r[0] for r in _validation_view(records)] == [2, 4]
    assert _training_view(records) == _training_view(one_process[0])


def test_val_loss_under_tensor_parallelism_is_within_the_training_tolerance(tmp_path, one_process):
    """TP splits the matmul sums (docs/layout-invariance.md), so val_loss is held to training's 1e-5."""
    records, _ = _run(tmp_path, 2, [*DETERMINISTIC, *VALIDATION, "--parallelism.tensor_parallel_degree", "2"])
    got, expected = _validation_view(records), _validation_view(one_process[0])
    assert [r[0] for r in got] == [r[0] for r in expected] == [2, 4]
    for (_, loss, _, tokens), (_, ref_loss, _, ref_tokens) in zip(got, expected, strict=True):
        assert tokens == ref_tokens and abs(loss - ref_loss) <= 1e-5 * ref_loss


@pytest.mark.parametrize("world_size, layout", [(1, FULL_AC), (2, [*PIPELINE, *FULL_AC])], ids=["one-ac", "pp2-ac"])
def test_validation_leaves_training_bitwise_untouched(tmp_path, world_size, layout):
    """Training losses, grad norms and final weights are the same bits with validation on and off
    (the pipeline's training schedule survives the forward-only passes; the RNG streams and the
    loader are untouched)."""
    off, off_weights = _run(tmp_path / "off", world_size, [*DETERMINISTIC, *layout])
    on, on_weights = _run(tmp_path / "on", world_size, [*DETERMINISTIC, *layout, *VALIDATION])
    assert _training_view(on) == _training_view(off)
    assert len(_validation_view(on)) == 2 and not _validation_view(off)
    assert on_weights.keys() == off_weights.keys()
    assert all(torch.equal(on_weights[k], off_weights[k]) for k in on_weights)


def test_moe_validation_moves_no_router_bias(tmp_path):
    """DeepSeek-V3's router bias moves with routed-token counts; evaluation must not add to them."""
    moe = ["--model.name", "deepseek_v3", "--model.flavor", "debug", *DETERMINISTIC]
    off, off_weights = _run(tmp_path / "off", 1, moe)
    on, on_weights = _run(tmp_path / "on", 1, [*moe, *VALIDATION])
    assert _training_view(on) == _training_view(off)
    assert all(torch.equal(on_weights[k], off_weights[k]) for k in on_weights)


def test_val_loss_is_summed_over_tokens_not_averaged_over_batches(tmp_path):
    """val_loss is the summed cross-entropy of every evaluated token over their count (recomputed here
    with a plain forward), not a mean of per-batch means; val_ppl is its exp; elapsed_s grows."""
    config = tiny_config(tmp_path, *BATCH, *VALIDATION, "--training.steps", "2")
    with Trainer(config, show_progress=False) as trainer:
        trainer.train()
        validator, model = trainer.validator, trainer.model.parts[0]
        total, tokens = 0.0, 0
        with torch.no_grad():
            for g in range(validator.num_steps * validator.microbatches_per_step):
                mb = validator._microbatch(g)
                logits = model(mb.inputs, trainer.forward_backward.masks(mb.inputs))
                total += F.cross_entropy(
                    logits.flatten(0, 1).double(), mb.labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
                ).item()
                tokens += int((mb.labels != IGNORE_INDEX).sum())
    records = read_metrics(tmp_path / "run")
    last = [r for r in records if "val_loss" in r][-1]
    assert last["val_tokens"] == tokens
    assert last["val_loss"] == pytest.approx(total / tokens, rel=1e-6)
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0


def test_whole_split_pads_the_last_batch_with_ignored_windows(tmp_path):
    """steps = -1 reads every window of the split once; the padding adds no tokens."""
    config = tiny_config(tmp_path, *BATCH, "--validation.enable", "--validation.global_batch_size", "6")
    config.validation.local_batch_size = 3
    with Trainer(config, show_progress=False) as trainer:
        validator = trainer.validator
        windows = validator.windows.num_windows
        assert validator.num_steps == math.ceil(windows / 6)
        result = validator.evaluate()
    expected = sum(int((validator.windows.batch([w])[1] != IGNORE_INDEX).sum()) for w in range(windows))
    assert result.tokens == expected


def test_elapsed_s_continues_across_a_resume(tmp_path):
    checkpointed = [*BATCH, "--checkpoint.enable", "--checkpoint.interval", "2"]
    with Trainer(tiny_config(tmp_path, *checkpointed, "--training.steps", "2"), show_progress=False) as trainer:
        trainer.train()
    first = read_metrics(tmp_path / "run")[-1]["elapsed_s"]
    with Trainer(tiny_config(tmp_path, *checkpointed), show_progress=False) as trainer:
        trainer.train()
    resumed = [r for r in read_metrics(tmp_path / "run") if r["step"] > 2]
    assert resumed and all(r["elapsed_s"] > first for r in resumed)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--training.dataset", "json", "--training.dataset_path", "x.jsonl"], "validation.dataset"),
        ([*PIPELINE, "--validation.seq_len", "16"], "validation.seq_len"),
        (["--validation.dataset", "json"], "validation.dataset_path"),
    ],
)
def test_bad_validation_settings_fail_before_training(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config = tiny_config(tmp_path, *BATCH, "--validation.enable", *overrides)
        from lockstep.config import validate_job_config

        validate_job_config(config, 2 if PIPELINE[0] in overrides else 1)


def test_validation_appears_in_tensorboard_and_console(tmp_path, capsys):
    config = tiny_config(tmp_path, *BATCH, *VALIDATION, "--training.steps", "2", "--metrics.enable_tensorboard")
    with Trainer(config, show_progress=True) as trainer:
        trainer.train()
    assert "val_loss" in capsys.readouterr().out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert "val_loss" in events.Tags()["scalars"]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["val_tokens"] > 0


def test_a_checkpoint_from_before_elapsed_s_still_resumes(tmp_path, monkeypatch):
    """Checkpoints written before train_state had elapsed_s load, with the clock starting at 0."""
    from lockstep.train.trainer import TrainState

    checkpointed = [*BATCH, "--checkpoint.enable", "--checkpoint.interval", "2"]
    older = TrainState.state_dict
    monkeypatch.setattr(
        TrainState, "state_dict", lambda self: {k: v for k, v in older(self).items() if k != "elapsed_s"}
    )
    with Trainer(tiny_config(tmp_path, *checkpointed, "--training.steps", "2"), show_progress=False) as trainer:
        trainer.train()
    monkeypatch.setattr(TrainState, "state_dict", older)
    with Trainer(tiny_config(tmp_path, *checkpointed), show_progress=False) as trainer:
        assert trainer.state.step == 2 and trainer.state.elapsed_s == 0.0
        trainer.train()
    assert trainer.state.step == 4


def test_the_default_evaluation_batch_is_trainings_global_batch_in_every_layout(tmp_path):
    """Not local x data-parallel degree: one process and FSDP 2 evaluate the same windows by default."""
    from lockstep.config.errors import ConfigError
    from lockstep.config.job import resolve_parallel_dims, resolve_validation

    config = tiny_config(tmp_path, *BATCH, "--validation.enable")
    batches = [resolve_validation(config, resolve_parallel_dims(config.parallelism, world)) for world in (1, 2, 4)]
    assert [b.global_batch for b in batches] == [8, 8, 8]
    odd = tiny_config(tmp_path, *BATCH, "--validation.enable", "--validation.local_batch_size", "3")
    with pytest.raises(ConfigError, match="defaults to training's global batch \\(8\\).*3 x 1"):
        resolve_validation(odd, resolve_parallel_dims(odd.parallelism, 1))
