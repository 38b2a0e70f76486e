"""Every parallel layout against one process, same seed, global batch and microbatches.

Bitwise identical (per-step loss, grad norm, final weights) wherever lockstep's reductions are
canonical: FSDP at 2 and 4 ranks, HSDP 2x2, every pipeline schedule that accumulates through
autograd, and pipeline x FSDP. Tensor parallelism splits matmul reductions over ranks, so it is
held to 1e-5 relative (docs/layout-invariance.md says why it cannot be bitwise).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from lockstep.config.errors import ConfigError
from lockstep.run.folder import read_metrics
from lockstep.tools.estimate.wire import WireCounter
from lockstep.train.trainer import Trainer
from tests.distributed import run_in_folder, run_on_ranks
from tests.helpers import merged_rank_weights, save_rank_weights, tiny_config

SAME_BATCH = ["--training.steps", "6", "--training.global_batch_size", "8", "--training.local_batch_size", "2"]
# Chunked deterministic linears of 2 (the tiny model's largest TP degree), so TP 2 matches one process.
DETERMINISTIC = [*SAME_BATCH, "--debug.deterministic", "--debug.fingerprint", "--debug.deterministic_chunks", "2"]


def _pipeline(degree: int, schedule: str) -> list[str]:
    return [
        "--parallelism.pipeline_parallel_degree", str(degree),
        "--parallelism.pipeline_parallel_schedule", schedule,
        "--parallelism.pipeline_parallel_microbatch_size", "2",
    ]  # fmt: skip


def _train(folder, overrides: list[str]) -> None:
    with Trainer(tiny_config(folder, *overrides), show_progress=False) as trainer:
        trainer.train()
        save_rank_weights(trainer, folder)


def _result(folder) -> tuple[list[tuple], dict[str, torch.Tensor]]:
    """Per-step (step, loss, grad norm, fingerprints) and the whole model's merged weights."""
    weights = merged_rank_weights(folder)
    records = read_metrics(folder / "run")
    fields = ("step", "loss", "grad_norm", "grad_fingerprint", "param_fingerprint")
    return [tuple(m.get(f) for f in fields) for m in records], weights


def _run(folder, world_size: int, overrides: list[str]):
    run_in_folder(_train, world_size, folder, overrides)
    return _result(folder)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one"), 1, DETERMINISTIC)


@pytest.mark.parametrize(
    "world_size, layout",
    [
        (2, []),  # FSDP 2 (data_parallel_shard_degree = -1 fills the world); FSDP 3 and 4 ranks: below
        (4, ["--parallelism.data_parallel_replicate_degree", "2"]),  # HSDP 2x2
        (2, _pipeline(2, "GPipe")),  # 1F1B: PP 2 x FSDP 2 here, PP 2 alone in bf16
        (4, _pipeline(2, "1F1B")),  # PP 2 x FSDP 2
        (4, [*_pipeline(2, "GPipe"), "--parallelism.data_parallel_replicate_degree", "2"]),  # PP 2 x DDP 2
    ],
    ids=["fsdp2", "hsdp2x2", "pp2-gpipe", "pp2xfsdp2", "pp2xddp2"],
)
def test_layout_is_bitwise_identical_to_one_process(tmp_path, one_process, world_size, layout):
    metrics, weights = _run(tmp_path, world_size, DETERMINISTIC + layout)
    reference_metrics, reference_weights = one_process
    assert len(metrics) == 6
    assert all(m[3] and m[4] for m in metrics)  # fingerprints were recorded, and are equal below
    assert metrics == reference_metrics
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)


FOUR_MICROSTEPS = [*DETERMINISTIC, "--training.steps", "2", "--training.local_batch_size", "1"]  # 8 microbatches
PIPELINE_MICROBATCH_1 = [*_pipeline(2, "1F1B")[:-1], "1"]


def _train_recording_tree(folder, overrides: list[str]) -> None:
    """_train, and rank 0 writes what its gradient tree held at most against its shard of the model."""
    with Trainer(tiny_config(folder, *overrides), show_progress=False) as trainer:
        trainer.train()
        save_rank_weights(trainer, folder)
        shard = sum(p.to_local().numel() for _, p in trainer.named_params)
        if trainer.world.is_main:
            figures = {"peak_held": trainer.gradient_tree.peak_held_numel, "shard": shard}
            (folder / "tree_memory.json").write_text(json.dumps(figures))


@pytest.mark.parametrize("world_size, layout", [(2, []), (4, PIPELINE_MICROBATCH_1)], ids=["fsdp2", "pp2xfsdp2"])
def test_fsdp_tree_over_four_micro_steps_is_bitwise(tmp_path, world_size, layout):
    """4 micro-steps per rank: the tree over micro-steps is kept on the shards (each micro-step's
    gradients are reduce-scattered in its backward, pipeline stages included), and a tree of 4
    differs from plain accumulation, so this checks its order (2 micro-steps could not tell). The
    tree holds log2(4) = 2 shards at most, not unsharded copies."""
    reference = _run(tmp_path / "one", 1, FOUR_MICROSTEPS)
    folder = tmp_path / "layout"
    folder.mkdir()
    run_on_ranks(_train_recording_tree, world_size, folder, [*FOUR_MICROSTEPS, *layout])
    metrics, weights = _result(folder)
    assert len(metrics) == 2 and metrics == reference[0]
    assert all(torch.equal(weights[k], reference[1][k]) for k in weights)
    figures = json.loads((folder / "tree_memory.json").read_text())
    assert figures["peak_held"] == 2 * figures["shard"]


def _tree_memory(folder) -> None:
    """One step of FSDP 2 with 4 microbatches (2 per rank); rank 0 writes what the gradient tree held."""
    config = tiny_config(folder, *DETERMINISTIC, "--training.steps", "1", "--training.global_batch_size", "4")
    with Trainer(config, show_progress=False) as trainer:
        trainer.train()
        shard = sum(p.to_local().numel() for _, p in trainer.named_params)
        model = sum(p.numel() for _, p in trainer.named_params)
        figures = {"peak_held": trainer.gradient_tree.peak_held_numel, "shard": shard, "model": model}
        if trainer.world.is_main:
            (folder / "tree_memory.json").write_text(json.dumps(figures))


def test_fsdp_gradient_tree_holds_one_shard_not_the_model(tmp_path):
    """The per-rank gradient accumulation holds this rank's shard (1/2 of the model on 2 ranks), not
    unsharded copies of the model."""
    run_on_ranks(_tree_memory, 2, tmp_path)
    figures = json.loads((tmp_path / "tree_memory.json").read_text())
    assert figures["peak_held"] == figures["shard"]
    assert figures["shard"] * 2 <= figures["model"] * 1.01  # FSDP pads dim 0 to a multiple of 2


def _assert_close(metrics, weights, reference, rtol: float) -> None:
    reference_metrics, reference_weights = reference
    assert [m[0] for m in metrics] == [m[0] for m in reference_metrics]
    for (_, loss, norm, *_), (_, ref_loss, ref_norm, *_) in zip(metrics, reference_metrics, strict=True):
        assert abs(loss - ref_loss) <= rtol * abs(ref_loss)
        assert abs(norm - ref_norm) <= 1e-3 * abs(ref_norm)  # the norm is a difference-sensitive quantity
    assert weights.keys() == reference_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, reference_weights[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "world_size, layout", [(4, ["--parallelism.tensor_parallel_degree", "2"])], ids=["fsdp2xtp2"]
)  # TP 2 alone: test_bf16_is_bitwise_identical_across_layouts[tp2]; TP 4: below
def test_tensor_parallel_is_bitwise_identical_to_one_process(tmp_path, one_process, world_size, layout):
    """Under debug.deterministic the linear layers sum their split dimension in fixed chunks at every
    degree (lockstep.parallel.canonical_linear), one process included."""
    metrics, weights = _run(tmp_path, world_size, DETERMINISTIC + layout)
    assert len(metrics) == 6 and all(m[3] and m[4] for m in metrics)
    assert metrics == one_process[0]
    assert all(torch.equal(weights[k], one_process[1][k]) for k in one_process[1])


DEEPER = ["--model.flavor", "debug", "--training.steps", "3", "--debug.deterministic_chunks", "4"]  # 6 layers


@pytest.fixture(scope="module")
def deeper_one_process(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("deeper"), 1, DETERMINISTIC + DEEPER)


def test_tensor_parallel_4_is_bitwise_identical_to_one_process(tmp_path, deeper_one_process):
    """With debug.deterministic_chunks 4 the linear layers sum 4 chunks at every degree up to 4."""
    metrics, weights = _run(tmp_path, 4, DETERMINISTIC + DEEPER + ["--parallelism.tensor_parallel_degree", "4"])
    assert len(metrics) == 3 and metrics == deeper_one_process[0]
    assert all(torch.equal(weights[k], deeper_one_process[1][k]) for k in deeper_one_process[1])


@pytest.mark.parametrize("schedule", ["Interleaved1F1B", "LoopedBFS"])
def test_multi_stage_schedules_are_bitwise(tmp_path, deeper_one_process, schedule):
    metrics, weights = _run(tmp_path, 2, DETERMINISTIC + DEEPER + _pipeline(2, schedule))
    assert metrics == deeper_one_process[0]
    assert all(torch.equal(weights[k], deeper_one_process[1][k]) for k in weights)


@pytest.fixture(scope="module")
def deeper_one_process_loose(tmp_path_factory):
    """Without debug.deterministic: plain linear layers (deterministic mode sums them in chunks)."""
    return _run(tmp_path_factory.mktemp("deeper-loose"), 1, [*SAME_BATCH, *DEEPER])


@pytest.mark.parametrize("schedule", ["ZBVZeroBubble", "DualPipeV"])
def test_zero_bubble_schedules_agree_to_rounding(tmp_path, deeper_one_process_loose, schedule):
    """They compute weight gradients outside autograd's accumulation, so only the default
    (non-canonical) reductions apply."""
    overrides = [*SAME_BATCH, *DEEPER, *_pipeline(2, schedule), "--debug.no-layout-invariant-reductions"]
    metrics, weights = _run(tmp_path, 2, overrides)
    _assert_close(metrics, weights, deeper_one_process_loose, rtol=1e-5)


def test_pipeline_ranks_get_distinct_logged_seeds(tmp_path):
    _run(tmp_path, 2, [*SAME_BATCH, "--training.steps", "1", *_pipeline(2, "1F1B")])
    seeds = json.loads((tmp_path / "run" / "env.json").read_text())["seeds"]
    by_rank = seeds["torch_by_pipeline_rank"]
    assert len(by_rank) == 2 and by_rank[0] != by_rank[1] and seeds["torch"] == by_rank[0]


def _expect_config_error(folder, overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Trainer(tiny_config(folder, *overrides), show_progress=False)


def test_bad_layouts_are_refused_on_every_rank(tmp_path):
    """A degree product that is not the world size fails before any collective (no rank hangs), and
    a TP degree that does not split the heads names the fix."""
    run_on_ranks(_expect_config_error, 2, tmp_path, ["--parallelism.tensor_parallel_degree", "4"], "not divisible")
    tp4 = ["--parallelism.tensor_parallel_degree", "4"]  # the tiny model has 2 kv heads
    run_on_ranks(_expect_config_error, 4, tmp_path, tp4, "does not divide n_kv_heads = 2; choose a divisor")


def test_even_and_explicit_stage_splits():
    from lockstep.parallel.pipeline import stage_layer_ranges, stages_of_rank

    names = [str(i) for i in range(6)]
    assert stage_layer_ranges(names, 4, []) == [["0", "1"], ["2", "3"], ["4"], ["5"]]
    assert stage_layer_ranges(names, 2, ["layers.1"]) == [["0"], ["1", "2", "3", "4", "5"]]
    with pytest.raises(ConfigError, match="increasing split points"):
        stage_layer_ranges(names, 3, ["layers.4", "layers.2"])
    with pytest.raises(ConfigError, match="only 6 layers"):
        stage_layer_ranges(names, 8, [])
    assert stages_of_rank(1, 2, "Interleaved1F1B") == [1, 3]
    assert stages_of_rank(1, 2, "ZBVZeroBubble") == [1, 2]


THREE_MICROBATCHES = [*DETERMINISTIC, "--training.steps", "4", "--training.global_batch_size", "6"]  # 3 x 2 samples
SIX_MICROBATCHES = [*THREE_MICROBATCHES, "--training.local_batch_size", "1"]


@pytest.fixture(scope="module")
def three_and_six_microbatches(tmp_path_factory):
    """One process with 3, and with 6, microbatches per step (neither a power of two)."""
    return {
        count: _run(tmp_path_factory.mktemp(f"one-{count}"), 1, overrides)
        for count, overrides in ((3, THREE_MICROBATCHES), (6, SIX_MICROBATCHES))
    }


@pytest.mark.parametrize(
    "microbatches, layout",
    [
        (3, []),  # FSDP 3, one microbatch each
        (6, ["--parallelism.data_parallel_replicate_degree", "3"]),  # DDP 3, two each: three subtrees of 2
        (6, ["--parallelism.data_parallel_replicate_degree", "2"]),  # DDP 2, three each: nodes [0,2) [2] | [3] [4,6)
    ],
    ids=["fsdp3", "ddp3-six-microbatches", "ddp2-three-each"],
)
def test_three_ranks_are_bitwise_identical_to_one_process(tmp_path, three_and_six_microbatches, microbatches, layout):
    overrides = THREE_MICROBATCHES if microbatches == 3 else SIX_MICROBATCHES
    ranks = 2 if "2" in layout else 3
    metrics, weights = _run(tmp_path, ranks, overrides + layout)
    reference_metrics, reference_weights = three_and_six_microbatches[microbatches]
    assert len(metrics) == 4 and all(m[3] and m[4] for m in metrics)
    assert metrics == reference_metrics
    assert all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights)


def test_blocks_that_are_not_subtrees_are_refused_with_batches_that_work():
    from lockstep.config import validate_job_config

    hsdp_three_each = tiny_config(
        Path("unused"), *SIX_MICROBATCHES, "--parallelism.data_parallel_replicate_degree", "2",
        "--training.global_batch_size", "12",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="power-of-two number of microbatches .*global_batch_size = 8 or 16"):
        validate_job_config(hsdp_three_each, world_size=4)
    fsdp3_two_each = tiny_config(Path("unused"), *SIX_MICROBATCHES)
    with pytest.raises(ConfigError, match="power-of-two shard degree, or one microbatch per rank"):
        validate_job_config(fsdp3_two_each, world_size=3)


BF16 = [*DETERMINISTIC, "--training.mixed_precision", "bf16", "--training.steps", "4"]


@pytest.fixture(scope="module")
def one_process_bf16(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one-bf16"), 1, BF16)


@pytest.mark.parametrize(
    "world_size, layout",
    [
        (2, []),  # FSDP 2
        (2, ["--parallelism.data_parallel_replicate_degree", "2"]),  # DDP 2
        (2, _pipeline(2, "1F1B")),
        (2, ["--parallelism.tensor_parallel_degree", "2"]),
    ],
    ids=["fsdp2", "ddp2", "pp2", "tp2"],  # HSDP is DDP over FSDP: both are here
)
def test_bf16_is_bitwise_identical_across_layouts(tmp_path, one_process, one_process_bf16, world_size, layout):
    """bf16 is one definition in every layout (FSDP's policy: bf16 parameters and activations, fp32
    gradients summed in the canonical tree), so the layouts agree bit for bit in bf16 too."""
    metrics, weights = _run(tmp_path, world_size, BF16 + layout)
    reference_metrics, reference_weights = one_process_bf16
    assert len(metrics) == 4 and all(m[3] and m[4] for m in metrics)
    fp32_losses, bf16_losses = [m[1] for m in one_process[0][:4]], [m[1] for m in reference_metrics]
    assert all(a != b and abs(a - b) < 0.02 * a for a, b in zip(fp32_losses, bf16_losses, strict=True))  # bf16 ran
    assert metrics == reference_metrics
    assert all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights)


def _train_counting_links(folder, overrides: list[str]) -> None:
    """_train with every collective this rank calls counted per link class (nodes as torchrun numbers them)."""
    rank, per_node = int(os.environ["RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    counter = WireCounter(rank, per_node)
    with Trainer(tiny_config(folder, *overrides), show_progress=False) as trainer:
        with counter:
            trainer.train()
        save_rank_weights(trainer, folder)
    (folder / f"links{rank}.json").write_text(json.dumps(counter.traffic.as_dict()))


@pytest.mark.parametrize(
    "layout, kind",
    [
        ([], "reduce_scatter (canonical all-to-all)"),
        (["--parallelism.data_parallel_replicate_degree", "4"], "all_reduce (canonical all-to-all + all-gather)"),
    ],
    ids=["fsdp4", "ddp4"],
)
def test_two_level_reductions_are_bitwise_and_send_a_hierarchical_rings_bytes(tmp_path, one_process, layout, kind):
    """4 ranks as 2 nodes x 2 (torchrun's numbering): the canonical sums run inside each node, then across
    nodes. Bitwise equal to one process, and each rank sends between nodes what a hierarchical ring sends:
    of a reduce-scatter of S bytes, S/2 inside the node and S/4 to the other node, where a flat all-to-all
    sends S/4 and S/2 (an all-reduce: twice both)."""
    run_on_ranks(_train_counting_links, 4, tmp_path, DETERMINISTIC + layout, ranks_per_node=2)
    metrics, weights = _result(tmp_path)
    assert metrics == one_process[0]
    assert all(torch.equal(weights[k], one_process[1][k]) for k in one_process[1])
    for rank in range(4):
        sent = json.loads((tmp_path / f"links{rank}.json").read_text())[kind]
        assert sent["inter"] > 0 and sent["inter"] == pytest.approx(sent["intra"] / 2, rel=0.01)
