"""lockstep estimate against measurement: the same rank's step run for real on gloo ranks (peak from
torch's MemTracker, or the CPU allocator's own record under pipelining; bytes counted at every
collective call) and traced on fake tensors at the job's world size. The whole matrix is
benchmarks/estimate_accuracy.py; this is a representative subset."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from lockstep.config import load_config, validate_job_config
from lockstep.config.job import resolve_parallel_dims
from lockstep.tools.estimate import Topology, device_spec, estimate
from lockstep.tools.estimate.devices import GIB
from lockstep.tools.estimate.estimate import DepthPlan
from lockstep.tools.estimate.measure import measure_rank
from tests.distributed import run_on_ranks
from tests.helpers import run_cli

VOCAB = 2048  # the built-in tokenizer's


def _measure_body(folder, name: str, overrides: list[str], world: int) -> None:
    config = load_config(name, overrides)
    validate_job_config(config, world)
    dims = resolve_parallel_dims(config.parallelism, world)
    dist.init_process_group("gloo")
    measured = measure_rank(config, dims, ranks_per_node=world, vocab_size=VOCAB)
    dist.destroy_process_group()
    record = {"peak": measured.peak_bytes, "traffic": measured.traffic.as_dict()}
    (folder / f"rank{measured.rank}.json").write_text(json.dumps(record))


def measured(tmp_path, name: str, overrides: list[str], world: int) -> dict[int, dict]:
    run_on_ranks(_measure_body, world, tmp_path, name, overrides, world)
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)}


def predicted(name: str, overrides: list[str], world: int):
    return estimate(load_config(name, overrides), Topology(1, world), device_spec("cpu"), vocab_size=VOCAB)


def allocated_gib(stage) -> float:
    """What the allocator holds at the peak: the estimate without the fixed overhead (the margin is zero on CPU)."""
    return sum(v for k, v in stage.memory.items() if k != "cuda_context_and_nccl")


def check(tmp_path, name: str, overrides: list[str], world: int) -> None:
    """Every stage's worst rank: peak within 10%, bytes of every collective kind within 1% (both links)."""
    real = measured(tmp_path, name, overrides, world)
    result = predicted(name, overrides, world)
    for stage in result.stages:
        truth = real[stage.rank]
        measured_gib = truth["peak"] / GIB
        assert abs(allocated_gib(stage) - measured_gib) <= 0.10 * measured_gib, (
            stage.stage,
            allocated_gib(stage),
            measured_gib,
        )
        assert set(stage.traffic) == set(truth["traffic"]), (stage.traffic, truth["traffic"])
        for kind, sent in truth["traffic"].items():
            for link in ("intra", "inter"):
                got = stage.traffic[kind][f"{link}_gb"] * 1e9
                assert abs(got - sent[link]) <= 0.01 * sent[link] + 64, (kind, link, got, sent[link])
            assert stage.traffic[kind]["calls"] == sent["calls"], kind


def test_one_process_bf16_selective_matches_measurement(tmp_path):
    check(
        tmp_path, "llama3_debug", ["--training.mixed_precision", "bf16", "--activation_checkpoint.mode", "selective"], 1
    )


def test_fsdp_2_deep_model_extrapolated_matches_measurement(tmp_path):
    """8 blocks: traced at 3 and 4 and extrapolated, against a real run of all 8."""
    overrides = ["--model.overrides.n_layers", "8"]
    assert DepthPlan.of(load_config("llama3_debug", overrides), resolve_parallel_dims(
        load_config("llama3_debug", overrides).parallelism, 2)) is not None  # fmt: skip
    check(tmp_path, "llama3_debug", overrides, 2)


def test_hsdp_2x2_deterministic_matches_measurement(tmp_path):
    check(tmp_path, "llama3_debug", ["--parallelism.data_parallel_replicate_degree", "2", "--debug.deterministic"], 4)


def test_tensor_parallel_2_matches_measurement(tmp_path):
    check(tmp_path, "llama3_debug", ["--parallelism.tensor_parallel_degree", "2"], 2)


def test_pipeline_2_full_ac_matches_measurement_on_both_stages(tmp_path):
    check(
        tmp_path,
        "llama3_debug",
        ["--parallelism.pipeline_parallel_degree", "2", "--activation_checkpoint.mode", "full"],
        2,
    )


def test_expert_parallel_2_bf16_matches_measurement(tmp_path):
    """DeepSeek-V3 with its dense and MoE blocks extrapolated (9 blocks) and the per-source expert copies."""
    overrides = ["--parallelism.expert_parallel_degree", "2", "--training.mixed_precision", "bf16",
                 "--model.overrides.n_layers", "9", "--model.overrides.n_dense_layers", "2"]  # fmt: skip
    check(tmp_path, "deepseek_v3_debug", overrides, 2)


def test_depth_plan_counts_blocks_per_stage():
    config = load_config("deepseek_v3_debug", ["--model.overrides.n_layers", "13", "--model.overrides.n_dense_layers", "3",
                                               "--parallelism.pipeline_parallel_degree", "2"])  # fmt: skip
    plan = DepthPlan.of(config, resolve_parallel_dims(config.parallelism, 2))
    assert plan.counts(plan.full) == [(3, 4), (0, 6)]  # earlier stages take the remainder
    assert [plan.counts(v)[0] for v in plan.variants] == [(1, 2), (1, 3), (2, 1)]
    # exactly linear figures come back exactly
    values = [{"x": 5 + 7 * d + 11 * m} for d, m in (plan.counts(v)[0] for v in plan.variants)]
    assert plan.extrapolate(0, values)["x"] == pytest.approx(5 + 7 * 3 + 11 * 4)


def test_cli_json_and_exit_codes(capfd):
    code, out, err = run_cli(
        ["estimate", "--config", "llama3_debug", "--nproc", "2", "--device", "cpu", "--json"], capfd
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"]["fits"] and result["layout"]["dp_shard"] == 2
    assert result["stages"][0]["traffic"]["reduce_scatter (canonical all-to-all)"]["calls"] > 0
    args = ["estimate", "--config", "llama3_debug", "--nproc", "3", "--parallelism.tensor_parallel_degree", "2"]
    code, out, err = run_cli(args, capfd)
    assert code == 2 and err.count("\n") == 1 and "parallelism" in err, err
    for bad in (["--vocab-size", "-5"], ["--parallelism.pipeline_parallel_degree", "2",
                                         "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B"]):  # fmt: skip
        code, out, err = run_cli(["estimate", "--config", "llama3_debug", "--nproc", "2", *bad], capfd)
        assert code == 2 and err.count("\n") == 1, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_predicted_peak_against_cuda_max_memory_allocated():
    """The 1B shape in bf16 with FlexAttention on one GPU: the estimate within 10% of the CUDA allocator's
    peak for the same step (without the fixed overhead, which the allocator does not see)."""
    from lockstep.tools.estimate.preflight import this_device

    overrides = ["--training.dataset", "builtin", "--training.dataset_path=", "--model.tokenizer", "builtin",
                 "--model.tokenizer_path=", "--data.no-document-masking"]  # fmt: skip
    config = load_config("llama3_1b", overrides)
    result = estimate(config, Topology(1, 1), this_device(0), vocab_size=VOCAB)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # FSDP's bf16 over one rank
    try:
        real = measure_rank(config, resolve_parallel_dims(config.parallelism, 1), ranks_per_node=1,
                            vocab_size=VOCAB, attention_backend="flex", device=torch.device("cuda", 0))  # fmt: skip
    finally:
        dist.destroy_process_group()
    predicted_gib, measured_gib = allocated_gib(result.stages[0]) / (1 + 0.05), real.peak_bytes / GIB
    print(f"1B on {torch.cuda.get_device_name(0)}, torch {torch.__version__}: predicted {predicted_gib:.2f} GiB, "
          f"max_memory_allocated {measured_gib:.2f} GiB")  # fmt: skip
    assert abs(predicted_gib - measured_gib) <= 0.10 * measured_gib
