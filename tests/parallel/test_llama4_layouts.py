"""Llama 4 across layouts, against one process (same seed, global batch and microbatches), with chunks
of 16 over a 32-token window and the NoPE block's temperature stepping every 8 positions, so both
layer kinds and their per-microbatch masks are exercised: bitwise under debug.deterministic for FSDP 2,
tensor parallelism 2, pipelining 2, expert parallelism 2 (with and without forced balance) and FSDP 2 with
full activation checkpointing (the MoE token counts skip the recompute); a
checkpoint saved under EP 2 resumes bitwise in one process and under FSDP 2."""

import shutil

import pytest

from lockstep.checkpoint import folders
from tests.checkpoint.helpers import assert_bitwise, result, train
from tests.distributed import run_on_ranks
from tests.parallel.test_layouts import DETERMINISTIC, _pipeline, _run
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
