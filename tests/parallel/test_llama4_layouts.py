"""Llama 4 across layouts, against one process (same seed, global batch and microbatches), with chunks
of 16 over a 32-token window and the NoPE block's temperature stepping every 8 positions, so both
layer kinds and their per-microbatch masks are exercised: bitwise under debug.deterministic for FSDP 2,
tensor parallelism 2, pipelining 2, expert parallelism 2 (with and without forced balance) and FSDP 2 with
full activation checkpointing (the MoE token counts skip the recompute); a
checkpoint saved under EP 2 resumes bitwise in one process and under FSDP 2."""

import shutil

import pytest
import torch.distributed as dist
from torch.distributed.tensor import Shard

from lockstep.checkpoint import folders
from lockstep.train.trainer import Trainer
from tests.checkpoint.helpers import assert_bitwise, result, train
from tests.distributed import run_in_folder, run_on_ranks
from tests.helpers import save_rank_weights, tiny_config
from tests.parallel.test_layouts import DETERMINISTIC, _pipeline, _result, _run
from tests.parallel.test_qwen3_layouts import EP2, TP2, _assert_bitwise

LLAMA4 = [
    "--model.name", "llama4", "--model.flavor", "debug", "--training.steps", "3",
    "--model.overrides.attention_chunk_size", "16", "--model.overrides.floor_scale", "8",
]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("llama4-one"), 1, [*DETERMINISTIC, *LLAMA4])


@pytest.mark.parametrize(
    "layout",
    [[], TP2, _pipeline(2, "1F1B"), EP2, [*EP2, "--debug.moe_force_load_balance"], ["--activation_checkpoint.mode", "full"]],
    ids=["fsdp2", "tp2", "pp2", "ep2", "ep2-balanced", "fsdp2-ac-full"],
)  # fmt: skip
def test_llama4_layout_is_bitwise_identical_to_one_process(tmp_path, one_process, layout):
    """PP 2 puts the dense block 2 and the MoE NoPE block 3 on the second stage, which builds its own
    microbatch's masks of both kinds; TP 2 splits the heads of both kinds of attention and runs the MoE
    blocks (shared expert included) whole; EP 2 scales each token before its expert on the far rank."""
    balanced = "--debug.moe_force_load_balance" in layout
    if balanced:
        reference = _run(tmp_path / "one", 1, [*DETERMINISTIC, *LLAMA4, "--debug.moe_force_load_balance"])
    else:
        reference = one_process
    _assert_bitwise(_run(tmp_path / "layout", 2, [*DETERMINISTIC, *LLAMA4, *layout]), reference)


MOE_RESUMED = [*LLAMA4, "--training.steps", "8", "--checkpoint.interval", "3"]


def test_an_expert_parallel_checkpoint_resumes_bitwise_in_one_process_and_fsdp(tmp_path):
    """Stopped under EP 2 after step 4 or so (saved then); one process and FSDP 2 go on, and each ends
    with the uninterrupted one-process run's losses, grad norms and weights."""
    (tmp_path / "whole").mkdir()
    train(tmp_path / "whole", MOE_RESUMED)
    uninterrupted = result(tmp_path / "whole")
    first = tmp_path / "first"
    first.mkdir()
    run_on_ranks(train, 2, first, [*MOE_RESUMED, *EP2], 4, "first")
    assert folders.published_steps(first / "run" / "checkpoint")
    for name, world_size in (("one", 1), ("fsdp2", 2)):
        shutil.copytree(first, tmp_path / name)
        if world_size == 1:
            train(tmp_path / name, MOE_RESUMED)
        else:
            run_on_ranks(train, 2, tmp_path / name, MOE_RESUMED)
        assert_bitwise(result(tmp_path / name), uninterrupted)


THREE_EXPERTS = [*DETERMINISTIC, *LLAMA4, "--model.overrides.n_routed_experts", "3"]


def _train_checking_expert_placement(folder, overrides: list[str]) -> None:
    with Trainer(tiny_config(folder, *overrides), show_progress=False) as trainer:
        experts = trainer.model.parts[0].layers["1"].moe.experts
        if (
            dist.is_initialized() and dist.get_world_size() == 2
        ):  # 3 experts over 2 ranks: dim 1 (256 rows) instead of a padded dim 0
            assert all(
                w.placements == (Shard(1),) and w.to_local().shape == (3, 128, 256) for w in (experts.w1, experts.w3)
            )
            assert experts.w2.placements == (Shard(1),) and experts.w2.to_local().shape == (3, 128, 256)
        trainer.train()
        save_rank_weights(trainer, folder)


def test_fsdp_shards_experts_on_dim_1_when_the_degree_does_not_divide_them_and_stays_bitwise(tmp_path):
    """FSDP would pad 3 experts to 4 rows over 2 ranks (at 64 ranks, 16 experts to 64): the grouped
    expert weights are sharded on their second dim instead, and the run stays bitwise."""
    results = []
    for world_size in (1, 2):
        run_in_folder(_train_checking_expert_placement, world_size, tmp_path / str(world_size), THREE_EXPERTS)
        results.append(_result(tmp_path / str(world_size)))
    _assert_bitwise(results[1], results[0])
