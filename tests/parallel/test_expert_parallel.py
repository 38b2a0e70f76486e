"""The MoE model across layouts: FSDP, tensor parallelism and expert parallelism are bitwise (EP runs
the local experts once per source rank's microbatch and sums their weight gradients canonically), also
in bf16, checkpoints carry the router bias and reshard from EP 2 to one process, and the expert dispatch
reads the device once per layer."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lockstep.checkpoint import folders
from lockstep.checkpoint.safe_reader import SafeFileSystemReader
from lockstep.config import load_config, validate_job_config
from lockstep.config.job import resolve_parallel_dims
from lockstep.config.sections import ActivationCheckpointConfig
from lockstep.models.deepseek_v3 import DEEPSEEK_V3_FLAVORS, DeepSeekV3
from lockstep.parallel.activation_checkpoint import apply_activation_checkpointing
from lockstep.parallel.expert_parallel import apply_expert_parallel
from lockstep.run.folder import read_metrics
from lockstep.tools.estimate.measure import measure_rank
from lockstep.tools.estimate.rank_step import RankStep
from lockstep.train.observe.moe_balance import moe_blocks, move_expert_biases
from tests.checkpoint.helpers import assert_bitwise, result, train
from tests.distributed import run_on_ranks
from tests.helpers import host_reads

MOE = [
    "--model.name",
    "deepseek_v3",
    "--model.flavor",
    "debug",
    "--training.steps",
    "10",
    "--debug.deterministic_chunks",
    "4",
]
EP2 = ["--parallelism.expert_parallel_degree", "2"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe-one")
    train(folder, MOE)
    return result(folder)


def test_repeat_and_fsdp_runs_are_bitwise(tmp_path, one_process):
    (tmp_path / "again").mkdir()
    train(tmp_path / "again", MOE)
    assert_bitwise(result(tmp_path / "again"), one_process)
    (tmp_path / "fsdp").mkdir()
    run_on_ranks(train, 2, tmp_path / "fsdp", MOE)
    assert_bitwise(result(tmp_path / "fsdp"), one_process)


@pytest.fixture(scope="module")
def expert_parallel_2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe-ep2")
    run_on_ranks(train, 2, folder, MOE + EP2)
    return result(folder)


def test_expert_parallel_2_is_bitwise_identical_to_one_process(expert_parallel_2, one_process):
    """The local experts run once per source rank (one microbatch each), and their weight gradients are
    summed in the canonical tree over the source ranks."""
    assert_bitwise(expert_parallel_2, one_process)


def test_expert_parallel_2_in_bf16_with_forced_balance_is_bitwise_identical_to_one_process(tmp_path):
    """bf16 is FSDP's policy everywhere; EP casts its experts the same way, and each source's expert
    gradients reach fp32 before the canonical sum, as one process's per-microbatch gradients do. With
    forced balance every expert gets tokens from every source (the fp32 test above routes freely)."""
    balanced_bf16 = MOE + ["--training.mixed_precision", "bf16", "--debug.moe_force_load_balance"]
    balanced_bf16 += ["--training.steps", "4"]
    (tmp_path / "one").mkdir()
    train(tmp_path / "one", balanced_bf16)
    run_on_ranks(train, 2, tmp_path / "ep2", balanced_bf16 + EP2)
    assert_bitwise(result(tmp_path / "ep2"), result(tmp_path / "one"))


def test_expert_parallel_checkpoint_resumes_in_one_process(tmp_path, one_process):
    """Stopped at EP 2 after step 6 or so; the checkpoint holds the router biases; one process goes on."""
    first = tmp_path / "first"
    first.mkdir()
    run_on_ranks(train, 2, first, MOE + EP2, 6, "first")
    step, folder = folders.published_steps(first / "run" / "checkpoint")[-1]
    keys = SafeFileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert "model.layers.1.moe.expert_bias" in keys
    continued = tmp_path / "continued"
    shutil.copytree(first, continued)
    train(continued, MOE)
    assert_bitwise(result(continued), one_process)


def test_moe_resume_is_bitwise(tmp_path, one_process):
    train(tmp_path, MOE, stop_at=5)
    train(tmp_path, MOE)
    assert_bitwise(result(tmp_path), one_process)
    last = read_metrics(tmp_path / "run")[-1]
    assert last["moe/layers.1/bias_absmax"] > 0  # the router bias moved, and was restored on resume
    assert last["moe/layers.1/load_min"] > 0


def test_pipeline_and_activation_checkpointing_keep_moe_bitwise(tmp_path, one_process):
    """Token counts (which move the router bias) must ignore a stage's shape-inference pass and
    activation-checkpoint recomputes; both layouts then match one process bitwise."""
    (tmp_path / "pp").mkdir()
    pipeline = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_microbatch_size", "2"]
    run_on_ranks(train, 2, tmp_path / "pp", MOE + pipeline)
    assert_bitwise(result(tmp_path / "pp"), one_process)
    last = read_metrics(tmp_path / "pp" / "run")[-1]
    assert {"moe/layers.1/load_cv", "moe/layers.3/load_cv"} <= last.keys()  # both stages' layers reported
    (tmp_path / "ac").mkdir()
    train(tmp_path / "ac", MOE + ["--activation_checkpoint.mode", "full"])
    assert_bitwise(result(tmp_path / "ac"), one_process)


@pytest.mark.parametrize("world_size", [4], ids=["fsdp2xtp2"])  # TP 4 alone: below
def test_tensor_parallel_attention_is_bitwise(tmp_path, one_process, world_size):
    """MLA heads split over 2 ranks (MoE blocks whole on each), alone and under FSDP: under
    debug.deterministic the linear layers and the shared RoPE key's gradient sum in fixed chunks."""
    run_on_ranks(train, world_size, tmp_path, MOE + ["--parallelism.tensor_parallel_degree", "2"])
    assert_bitwise(result(tmp_path), one_process)


def test_tensor_parallel_4_is_bitwise(tmp_path):
    """TP 4 splits the 8 heads 4 ways; the chunks (debug.deterministic_chunks 4) are the same at every degree."""
    steps = MOE + ["--training.steps", "4"]
    (tmp_path / "one").mkdir()
    train(tmp_path / "one", steps)
    run_on_ranks(train, 4, tmp_path / "tp4", steps + ["--parallelism.tensor_parallel_degree", "4"])
    assert_bitwise(result(tmp_path / "tp4"), result(tmp_path / "one"))


def test_dispatch_and_balance_read_the_device_once_per_layer_and_step():
    """One transfer per MoE layer and forward (the all-to-all's split sizes), again in an activation-
    checkpoint recompute, none without EP; the bias update none, its statistics one for all layers.
    (Before: 2 + 2E reads per layer and forward, 4 per layer for the statistics.)"""
    args = dataclasses.replace(DEEPSEEK_V3_FLAVORS["debug"], vocab_size=97, max_seq_len=32)
    tokens = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        models = []
        for expert_parallel in (False, True):
            with torch.device("meta"):
                model = DeepSeekV3(args)
            if expert_parallel:
                apply_expert_parallel(model, init_device_mesh("cpu", (1,), mesh_dim_names=("dp_shard",)))
                apply_activation_checkpointing(model.layers, ActivationCheckpointConfig(mode="full"))
            model.init_weights(0, "cpu")
            models.append(model)
        with host_reads() as plain:
            expected = models[0](tokens)
        with host_reads() as forward:
            out = models[1](tokens)
        with host_reads() as backward:
            out.square().mean().backward()
        blocks = moe_blocks([models[1]])
        with host_reads() as balance:
            stats = move_expert_biases(blocks, 1e-3, None)
        with host_reads() as read:
            floats = stats.as_floats()
    finally:
        dist.destroy_process_group()
    assert torch.equal(out, expected)  # EP over one rank is the same computation
    assert plain == {} and balance == {} and len(floats) == 4 * len(blocks) == 12
    assert forward == backward == {"expert_parallel.py": len(blocks)}
    assert read == {"moe_balance.py": 1}


def _saved_expert_storages(step: RankStep, local_experts: int) -> list[int]:
    """Run the step; for each MoE layer's forward, the distinct storages of expert-weight-shaped tensors
    (the debug flavor's [local experts, 128, 256] and [local experts, 256, 128]) autograd saved for backward."""
    shapes = {(local_experts, 128, 256), (local_experts, 256, 128)}
    per_layer, current = [], set()
    for _, block in moe_blocks(step.model.parts):
        block.register_forward_pre_hook(lambda *_: current.clear())
        block.register_forward_hook(lambda *_: per_layer.append(len(current)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) in shapes:
            current.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step.run()
    return per_layer


def _expert_memory_body(folder, ep: int) -> None:
    """Per rank, canonical against plain reductions at the same EP degree (bf16, where every source call
    used to get its own cast): the expert weight storages each MoE layer saves for backward, and the step's
    peak by torch's MemTracker."""
    dist.init_process_group("gloo")
    figures = {}
    for mode, canonical in (("canonical", "true"), ("plain", "false")):
        overrides = [
            "--training.mixed_precision",
            "bf16",
            "--training.local_batch_size",
            "2",
            "--training.seq_len",
            "64",
        ]
        overrides += ["--parallelism.expert_parallel_degree", str(ep), "--debug.layout_invariant_reductions", canonical]
        config = load_config("deepseek_v3_debug", overrides)
        validate_job_config(config, ep)
        dims = resolve_parallel_dims(config.parallelism, ep)
        step = RankStep(config, dims, vocab_size=2048, device=torch.device("cpu"), attention_backend="sdpa",
                        ranks_per_node=ep)  # fmt: skip
        saved_per_layer = _saved_expert_storages(step, local_experts=8 // ep)
        measured = measure_rank(config, dims, ranks_per_node=ep, vocab_size=2048)
        figures[mode] = {"saved_per_layer": sorted(set(saved_per_layer)), "peak": measured.peak_bytes}
    dist.destroy_process_group()
    (folder / f"rank{os.environ['RANK']}.json").write_text(json.dumps(figures))


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_memory_does_not_grow_with_the_degree(tmp_path, ep):
    """The source calls share one cast of each local expert weight (3 saved expert tensors per MoE layer,
    as on the plain path, not 3 x ep), and their gradients meet in a tree of O(log ep) partial sums: the
    peak stays within 10% of the plain path's at the same degree."""
    run_on_ranks(_expert_memory_body, ep, tmp_path, ep)
    for rank in range(ep):
        figures = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert figures["canonical"]["saved_per_layer"] == figures["plain"]["saved_per_layer"] == [3]
        assert figures["canonical"]["peak"] <= 1.10 * figures["plain"]["peak"]
