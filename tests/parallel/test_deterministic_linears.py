"""debug.deterministic's chunked linears: one operator to selective activation checkpointing (it saves the
layer's output, never the chunks' partial products), partial products accumulated in fp32, and a chunk
count that is the run's tensor-parallel degree unless set, recorded, and never below the degree."""

import pytest
import torch

from lockstep.config import load_config
from lockstep.config.errors import ConfigError
from lockstep.config.job import resolve_parallel_dims
from lockstep.parallel import activation_checkpoint
from lockstep.parallel.canonical_linear import tree_of_products
from lockstep.parallel.parallelize import check_model_fits_layout
from lockstep.tools.estimate.measure import measure_rank

SMALL = ["--training.seq_len", "128", "--training.local_batch_size", "2", "--training.global_batch_size", "2"]
SELECTIVE_OP = ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"]


def _peak_and_saved_ops(overrides: list[str], monkeypatch) -> tuple[int, set]:
    """One step of llama3_debug in this process: its peak (torch's MemTracker) and the ops the selective
    AC policy chose to save."""
    saved = set()
    policy = activation_checkpoint._save_matmuls_policy

    def recording(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if decision == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE:
            saved.add(op)
        return decision

    monkeypatch.setattr(activation_checkpoint, "_save_matmuls_policy", recording)
    config = load_config("llama3_debug", [*SMALL, *SELECTIVE_OP, *overrides])
    measured = measure_rank(config, resolve_parallel_dims(config.parallelism, 1), ranks_per_node=1, vocab_size=2048)
    return measured.peak_bytes, saved


def test_selective_ac_saves_the_chunked_linears_output_not_their_partial_products(monkeypatch):
    """8 chunks: the partial products would be 8 x the output of wo and w2. Selective AC sees one operator
    and saves its output, so the peak stays near the plain linears' (it was 2.4x with 16 chunks)."""
    chunked_peak, chunked_saved = _peak_and_saved_ops(
        ["--debug.deterministic", "--debug.deterministic_chunks", "8"], monkeypatch
    )
    plain_peak, plain_saved = _peak_and_saved_ops([], monkeypatch)
    assert tree_of_products._opoverload in chunked_saved and torch.ops.aten.bmm.default not in chunked_saved
    assert tree_of_products._opoverload not in plain_saved
    assert chunked_peak <= 1.15 * plain_peak, (chunked_peak, plain_peak)


def test_partial_products_are_accumulated_in_fp32():
    """bf16 inputs: the chunks' products are summed in fp32 and rounded once, so the result is the fp32
    result rounded to bf16 (a bf16 sum would round at each of the 7 additions)."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(64, 512, generator=generator).bfloat16()
    right = torch.randn(512, 32, generator=generator).bfloat16()
    exact = tree_of_products(left.float(), right.float(), 8, True)
    assert torch.equal(tree_of_products(left, right, 8, True), exact.bfloat16())
    assert torch.equal(tree_of_products(left, right, 8, False), exact)  # a rank's share: fp32, for the rank sum


def test_the_chunk_count_is_the_tensor_parallel_degree_unless_set_and_never_below_it():
    config = load_config("llama3_debug", ["--debug.deterministic", "--parallelism.tensor_parallel_degree", "2"])
    check_model_fits_layout(config.model, resolve_parallel_dims(config.parallelism, 2), config.debug)
    assert config.debug.deterministic_chunks == 2  # resolved, and recorded in config.toml with the run
    resumed = load_config(
        "llama3_debug",
        ["--debug.deterministic", "--debug.deterministic_chunks", "2", "--parallelism.tensor_parallel_degree", "4"],
    )
    with pytest.raises(ConfigError, match="2 chunks cannot give tensor-parallel degree 4 the same bits"):
        check_model_fits_layout(resumed.model, resolve_parallel_dims(resumed.parallelism, 4), resumed.debug)
    odd = load_config("llama3_debug", ["--debug.deterministic", "--debug.deterministic_chunks", "3"])
    with pytest.raises(ConfigError, match="power of two"):
        odd.debug.validate()
