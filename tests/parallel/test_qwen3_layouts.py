"""Qwen3 and Qwen3-MoE across layouts, against one process (same seed, global batch and microbatches):
bitwise under debug.deterministic for FSDP, tensor parallelism (its QK-norm weights and the tied
embedding included), pipelining (an untied variant: a tied model refuses it) and, for Qwen3-MoE,
expert parallelism (with and without forced balance), TP and PP; the plain DTensor tensor-parallel
plan agrees to rounding."""

import dataclasses

import pytest
import torch

from lockstep.config.errors import ConfigError
from lockstep.config.job import resolve_parallel_dims
from lockstep.models.qwen3 import QWEN3_FLAVORS
from lockstep.parallel.parallelize import check_model_fits_layout
from tests.distributed import run_in_folder
from tests.helpers import tiny_config
from tests.parallel.test_layouts import DETERMINISTIC, SAME_BATCH, _pipeline, _result, _run, _train

QWEN3 = ["--model.name", "qwen3", "--model.flavor", "debug", "--training.steps", "3"]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("qwen3-one"), 1, [*DETERMINISTIC, *QWEN3])


def _assert_bitwise(got, reference, steps: int = 3) -> None:
    (metrics, weights), (reference_metrics, reference_weights) = got, reference
    assert len(metrics) == steps and all(m[3] and m[4] for m in metrics)  # fingerprints recorded, equal below
    assert metrics == reference_metrics
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)


@pytest.mark.parametrize("world_size, layout", [(2, []), (2, TP2), (4, TP2)], ids=["fsdp2", "tp2", "fsdp2xtp2"])
def test_qwen3_layout_is_bitwise_identical_to_one_process(tmp_path, one_process, world_size, layout):
    """TP 2 splits the tied embedding and output projection by vocabulary (one tensor, gathered for the
    lookup) and the heads, whose shared QK-norm weights sum their gradients in canonical chunks."""
    got = _run(tmp_path, world_size, [*DETERMINISTIC, *QWEN3, *layout])
    assert "output.weight" not in got[1]  # tied: one tensor, saved and compared as tok_embeddings.weight
    _assert_bitwise(got, one_process)


def test_qwen3_plain_tensor_parallel_plan_agrees_to_rounding(tmp_path):
    """Without debug.deterministic: the DTensor plan (sequence and loss parallelism, the tied weight one
    vocabulary-sharded DTensor, the QK-norm gradients all-reduced)."""
    reference = _run(tmp_path / "one", 1, [*SAME_BATCH, *QWEN3])
    metrics, weights = _run(tmp_path / "tp2", 2, [*SAME_BATCH, *QWEN3, *TP2])  # the ranks agree (merged)
    for (_, loss, norm, *_), (_, ref_loss, ref_norm, *_) in zip(metrics, reference[0], strict=True):
        assert abs(loss - ref_loss) <= 1e-5 * ref_loss and abs(norm - ref_norm) <= 1e-3 * ref_norm
    assert weights.keys() == reference[1].keys()
    for name, value in weights.items():  # AdamW's first steps turn rounding in a near-zero gradient into
        torch.testing.assert_close(value, reference[1][name], rtol=1e-3, atol=2e-4)  # up to ~lr: a few elements
    for name in ("layers.0.attention.q_norm.weight", "layers.3.attention.k_norm.weight"):  # trained, and alike
        assert not torch.equal(weights[name], torch.ones_like(weights[name]))
        torch.testing.assert_close(weights[name], reference[1][name], rtol=0, atol=1e-5)


def _train_untied(folder, overrides: list[str]) -> None:
    QWEN3_FLAVORS["debug_untied"] = dataclasses.replace(QWEN3_FLAVORS["debug"], tie_embeddings=False)
    _train(folder, overrides)


def test_qwen3_pipeline_is_bitwise_and_refused_for_tied_embeddings(tmp_path):
    untied = [*DETERMINISTIC, *QWEN3, "--model.flavor", "debug_untied"]
    results = []
    for world_size, layout in ((1, []), (2, _pipeline(2, "1F1B"))):
        run_in_folder(_train_untied, world_size, tmp_path / str(world_size), [*untied, *layout])
        results.append(_result(tmp_path / str(world_size)))
    assert "output.weight" in results[0][1]
    _assert_bitwise(results[1], results[0])
    tied = tiny_config(tmp_path, *QWEN3, *_pipeline(2, "1F1B"))
    with pytest.raises(ConfigError, match="ties its output projection to the embedding"):
        check_model_fits_layout(tied.model, resolve_parallel_dims(tied.parallelism, 2))


MOE = ["--model.name", "qwen3_moe", "--model.flavor", "debug", "--training.steps", "3"]
EP2 = ["--parallelism.expert_parallel_degree", "2"]


@pytest.fixture(scope="module")
def moe_one_process(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("qwen3-moe-one"), 1, [*DETERMINISTIC, *MOE])


@pytest.mark.parametrize("layout", [EP2, TP2, _pipeline(2, "1F1B")], ids=["ep2", "tp2", "pp2"])
def test_qwen3_moe_layout_is_bitwise_identical_to_one_process(tmp_path, moe_one_process, layout):
    """EP 2 over the FSDP axis (the other weights FSDP-sharded); TP 2 splits the attention and runs the
    MoE blocks whole on each rank; PP 2 (untied, so allowed). The sequence-wise balance loss is on."""
    _assert_bitwise(_run(tmp_path, 2, [*DETERMINISTIC, *MOE, *layout]), moe_one_process)


def test_qwen3_moe_expert_parallel_2_with_forced_balance_is_bitwise(tmp_path):
    """Forced balance gives every expert tokens from both ranks."""
    overrides = [*DETERMINISTIC, *MOE, "--debug.moe_force_load_balance"]
    _assert_bitwise(_run(tmp_path / "ep2", 2, [*overrides, *EP2]), _run(tmp_path / "one", 1, overrides))
