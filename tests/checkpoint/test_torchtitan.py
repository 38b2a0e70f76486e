"""A checkpoint written by torchtitan 0.3.0's own trainer (tests/assets/torchtitan_0.3.0, made by its
make_fixture.py in a torch 2.14 environment) as checkpoint.initial_load_path: with the job translated by
``lockstep config from-torchtitan``, the run goes on from torchtitan's step 4 and its next losses, on the
batches torchtitan trained on, are torchtitan's to 1e-6; model-only, the weights are the checkpoint's
tensors (torchtitan 0.3's fused QKV and lm_head names mapped), at step 0."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tomli_w
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from lockstep.checkpoint.errors import CheckpointError, CheckpointMismatch
from lockstep.checkpoint.safe_reader import SafeFileSystemReader, SafeLoadPlanner
from lockstep.checkpoint.torchtitan import (
    is_torchtitan_checkpoint,
    load_torchtitan_checkpoint,
    split_fused_qkv,
    torchtitan_name,
)
from lockstep.config import load_config
from lockstep.config.sections import ModelConfig
from lockstep.data.loader import Microbatch
from lockstep.models.registry import model_args
from lockstep.parallel.canonical import full_value
from lockstep.run.folder import read_metrics
from lockstep.tools.torchtitan_config import from_torchtitan
from lockstep.train.trainer import Trainer
from tests.distributed import run_on_ranks

TITAN = Path(__file__).resolve().parents[1] / "assets" / "torchtitan_0.3.0"
STEP_4, STEP_8 = TITAN / "checkpoint" / "step-4", TITAN / "checkpoint" / "step-8"


def _translated_config(tmp_path: Path, *overrides: str):
    """The fixture's job as ``lockstep config from-torchtitan`` translates it, run here on the CPU (the data
    are fed by the test, so any tokenizer that fits the 2,048 rows does)."""
    (tmp_path / "job.toml").write_text(tomli_w.dumps(from_torchtitan(TITAN / "job.json").config))
    return load_config(str(tmp_path / "job.toml"), [
        "--job.dump_folder", str(tmp_path / "run"), "--model.tokenizer", "bytes", "--model.tokenizer_path=",
        "--training.device", "cpu", "--checkpoint.enable", "false", *overrides,
    ])  # fmt: skip


def _feed_torchtitan_batches(trainer: Trainer, steps: range) -> None:
    """Serve the batches torchtitan trained on at `steps`, in order, in place of the run's own data."""
    batches = load_file(TITAN / "batches.safetensors")
    queue = [Microbatch(batches[f"step{s}.input"], batches[f"step{s}.labels"]) for s in steps]
    trainer.loader.next_step = lambda *placement: _next(queue)


def _next(queue: list[Microbatch]) -> tuple[list[Microbatch], int]:
    microbatch = queue.pop(0)
    return [microbatch], microbatch.num_valid_tokens


def _stored(folder: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under torchtitan's names, read whole (through lockstep's safe reader)."""
    tensors = {name: torch.empty(shape) for name, shape in shapes.items()}
    dcp.load(tensors, storage_reader=SafeFileSystemReader(str(folder), verify=False),
             planner=SafeLoadPlanner(folder=str(folder)))  # fmt: skip
    return tensors


def _assert_moments_are_torchtitans(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Adam's moments as torchtitan saved them: each fused wqkv moment split into wq, wk and wv rows, the
    others by name."""
    params = dict(model.named_parameters())
    for layer in range(2):
        for slot in ("exp_avg", "exp_avg_sq"):
            fused = _stored(
                STEP_4, {f"optimizer.state.layers.{layer}.attention.qkv_linear.wqkv.weight.{slot}": (64, 32)}
            )
            split = split_fused_qkv(next(iter(fused.values())), head_dim=8, q_rows=32, kv_rows=16)
            for which in "qkv":
                assert torch.equal(
                    optimizer.state[params[f"layers.{layer}.attention.w{which}.weight"]][slot], split[which]
                )
    norm = _stored(STEP_4, {"optimizer.state.norm.weight.exp_avg_sq": (32,)})
    assert torch.equal(
        optimizer.state[params["norm.weight"]]["exp_avg_sq"], norm["optimizer.state.norm.weight.exp_avg_sq"]
    )
    assert int(optimizer.state[params["output.weight"]]["step"]) == 4


def test_a_torchtitan_checkpoint_resumes_at_its_step_with_torchtitans_next_losses(tmp_path):
    config = _translated_config(
        tmp_path, "--checkpoint.initial_load_path", str(STEP_4), "--checkpoint.initial_load_model_only", "false"
    )
    logged = {s["step"]: s for s in json.loads((TITAN / "steps.json").read_text())}
    with Trainer(config, show_progress=False) as trainer:
        assert trainer.state.step == 4 and trainer.state.tokens_seen == 4 * 2 * 64
        _assert_moments_are_torchtitans(trainer.model.parts[0], trainer.optimizers[0])
        _feed_torchtitan_batches(trainer, range(5, 9))
        trainer.train()
    records = {r["step"]: r for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert sorted(records) == [5, 6, 7, 8]
    for step, record in records.items():
        assert abs(record["loss"] - logged[step]["loss"]) < 1e-6, (step, record["loss"], logged[step]["loss"])
        assert record["lr"] == pytest.approx(logged[step]["lr"], rel=1e-12)


def _imported_state(folder: Path) -> None:
    """Start from the fixture's step 4 in this process's layout; rank 0 saves the full weights and Adam
    moments it holds then (DTensors gathered), by parameter name."""
    config = _translated_config(folder, "--checkpoint.initial_load_path", str(STEP_4), "--checkpoint.initial_load_model_only",
                                "false", *(["--parallelism.data_parallel_shard_degree", "2"] if "WORLD_SIZE" in os.environ else []))  # fmt: skip
    with Trainer(config, show_progress=False) as trainer:
        (part,), (optimizer,) = trainer.model.parts, trainer.optimizers
        moments = {
            f"{name}.{slot}": full_value(optimizer.state[param][slot]).clone()
            for name, param in part.named_parameters()
            for slot in ("exp_avg", "exp_avg_sq")
        }
        weights = trainer.full_weights()  # a collective: every rank gathers
        if trainer.world.is_main:
            torch.save({"weights": weights, "moments": moments, "step": trainer.state.step}, folder / "state.pt")


def test_a_torchtitan_checkpoint_loads_into_fsdp_as_into_one_process(tmp_path):
    """Each FSDP rank reads its shards of the weights and of the split fused moments: the state gathered
    from 2 ranks is the one-process state, bit for bit."""
    (tmp_path / "one").mkdir()
    (tmp_path / "fsdp").mkdir()
    _imported_state(tmp_path / "one")
    run_on_ranks(_imported_state, 2, tmp_path / "fsdp")
    one, fsdp = (torch.load(tmp_path / name / "state.pt") for name in ("one", "fsdp"))
    assert one["step"] == fsdp["step"] == 4
    for kind in ("weights", "moments"):
        assert one[kind].keys() == fsdp[kind].keys()
        assert all(torch.equal(one[kind][k], fsdp[kind][k]) for k in one[kind]), kind


def _titan_model(**changes) -> torch.nn.Module:
    """The fixture job's model (flavor custom, its fields from job.json), weights drawn by lockstep."""
    overrides = from_torchtitan(TITAN / "job.json").config["model"]["overrides"] | changes
    spec, args = model_args(ModelConfig(flavor="custom", overrides=overrides), 2048, 64)
    with torch.device("meta"):
        model = spec.build(args, "sdpa")
    model.init_weights(0, "cpu")
    return model


def test_a_model_only_torchtitan_save_gives_its_tensors_and_step_0():
    model = _titan_model()
    assert is_torchtitan_checkpoint(STEP_8) and load_torchtitan_checkpoint(
        STEP_8, states={}, parts=[model], family="llama3", head_dim=8, model_only=True
    ) is None  # fmt: skip
    names = {name: torchtitan_name(name, {"lm_head.weight", *(f"layers.{i}.attention.qkv_linear.w{w}.weight" for i in range(2) for w in "qkv")}) for name, _ in model.named_parameters()}  # fmt: skip
    assert names["output.weight"] == "lm_head.weight" and names["layers.1.attention.wk.weight"].endswith(
        "qkv_linear.wk.weight"
    )
    stored = _stored(STEP_8, {names[n]: tuple(p.shape) for n, p in model.named_parameters()})
    for name, param in model.named_parameters():
        assert torch.equal(param, stored[names[name]]), name


def test_what_cannot_be_taken_from_a_torchtitan_checkpoint_is_refused_in_one_line():
    model = _titan_model()
    with pytest.raises(CheckpointMismatch, match=r"holds no train_state.step.*initial_load_model_only = true"):
        load_torchtitan_checkpoint(STEP_8, states={}, parts=[model], family="llama3", head_dim=8, model_only=False)
    with pytest.raises(CheckpointError, match="lockstep reads for llama3 models, not qwen3"):
        load_torchtitan_checkpoint(STEP_8, states={}, parts=[model], family="qwen3", head_dim=8, model_only=True)
    wider = _titan_model(n_layers=3, ffn_hidden_size=96)
    with pytest.raises(
        CheckpointMismatch, match=r"does not fit this model: .*\(128, 32\) there, \(96, 32\) here.*more"
    ):
        load_torchtitan_checkpoint(STEP_8, states={}, parts=[wider], family="llama3", head_dim=8, model_only=True)


def test_torchtitans_fused_qkv_rows_split_per_key_value_group():
    """Rows of 2 key/value groups of 2 query heads (head_dim 1): q0 q1 k0 v0 q2 q3 k1 v1."""
    rows = torch.tensor([[0.0], [1], [100], [200], [2], [3], [101], [201]])
    split = split_fused_qkv(rows, head_dim=1, q_rows=4, kv_rows=2)
    assert split["q"].flatten().tolist() == [0, 1, 2, 3]
    assert split["k"].flatten().tolist() == [100, 101] and split["v"].flatten().tolist() == [200, 201]
