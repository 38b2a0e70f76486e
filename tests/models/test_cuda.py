"""CUDA-only paths: FlexAttention and deterministic GPU training. Skipped where there is no GPU
(CI never has one); run on a GPU machine with `pytest tests/models/test_cuda.py`."""

import dataclasses
import json

import pytest
import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks
from torch.nn.attention.flex_attention import BlockMask

from lockstep.models.common.masks import AttentionMasks
from lockstep.models.llama4 import LLAMA4_FLAVORS, Llama4
from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.distributed import run_on_ranks
from tests.helpers import tiny_config, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_flex_attention_matches_sdpa_with_document_masks():
    model = tiny_model(vocab_size=97, seq_len=256).cuda()
    tokens = torch.randint(0, 96, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    tokens[0, [40, 150]] = 96
    tokens[1, 90] = 96
    sdpa_masks = model.get_attention_masks(tokens, eos_id=96)
    model.attention_backend = "flex"
    flex_masks = model.get_attention_masks(tokens, eos_id=96)
    assert isinstance(flex_masks, AttentionMasks) and flex_masks.block_mask is not None
    sdpa_logits = model(tokens, sdpa_masks)
    flex_logits = model(tokens, flex_masks)
    torch.testing.assert_close(flex_logits, sdpa_logits, rtol=1e-4, atol=1e-4)
    flex_logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_deterministic_cuda_runs_are_bitwise_identical(tmp_path, attention):
    def run(name):
        config = tiny_config(
            tmp_path / name, "--training.device", "cuda", "--debug.deterministic", "--model.attention", attention,
            "--training.seq_len", "128",
        )  # fmt: skip
        trainer = Trainer(config, show_progress=False)
        return read_metrics(trainer.train()), trainer.full_weights()

    metrics_a, weights_a = run("a")
    metrics_b, weights_b = run("b")
    assert [(m["loss"], m["grad_norm"]) for m in metrics_a] == [(m["loss"], m["grad_norm"]) for m in metrics_b]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def _debug_on_cuda(folder, *overrides: str):
    """llama3_debug (document masking on) for a few deterministic steps on CUDA, 4 blocks of 128."""
    return tiny_config(
        folder, "--training.device", "cuda", "--model.flavor", "debug", "--training.seq_len", "512",
        "--training.steps", "3", "--training.local_batch_size", "4", "--debug.deterministic", *overrides,
    )  # fmt: skip


def test_document_masked_training_uses_flex_by_default_and_matches_sdpa(tmp_path):
    with Trainer(_debug_on_cuda(tmp_path / "auto"), show_progress=False) as trainer:
        assert trainer.config.model.attention == "auto" and trainer.attention_backend == "flex"
        assert isinstance(
            trainer.forward_backward.masks(torch.zeros(2, 512, dtype=torch.long, device="cuda")).block_mask, BlockMask
        )
        flex = read_metrics(trainer.train())
    assert json.loads((tmp_path / "auto" / "run" / "env.json").read_text())["layout"]["attention"] == "flex"
    with Trainer(_debug_on_cuda(tmp_path / "sdpa", "--model.attention", "sdpa"), show_progress=False) as trainer:
        sdpa = read_metrics(trainer.train())
    assert len(flex) == len(sdpa) == 3
    for a, b in zip(flex, sdpa, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_flex_masks_deferred_per_microbatch_match_the_whole_batch():
    """What a pipeline stage does: the schedule splits the deferred document ids, and forward builds
    each microbatch's BlockMask; logits and gradients flow as with the whole batch's mask."""
    model = tiny_model(vocab_size=97, seq_len=512).cuda()
    model.attention_backend = "flex"
    tokens = torch.randint(0, 96, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for row, ends in enumerate([[100, 300], [127], [40, 200, 201], [450]]):
        tokens[row, ends] = 96
    whole = model(tokens, model.get_attention_masks(tokens, eos_id=96))
    deferred = model.get_attention_masks(tokens, eos_id=96, deferred=True)
    _, chunks = split_args_kwargs_into_chunks((), {"attention_masks": deferred}, 2)
    parts = [model(tokens[2 * i : 2 * i + 2], **chunk) for i, chunk in enumerate(chunks)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)
    sum(part.sum() for part in parts).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.attention_backend = "sdpa"
    with torch.no_grad():
        sdpa = model(tokens, model.get_attention_masks(tokens, eos_id=96))
    torch.testing.assert_close(whole.detach(), sdpa, rtol=1e-4, atol=1e-4)


def _train_on_ranks(folder, overrides: list[str]) -> None:
    with Trainer(_debug_on_cuda(folder, *overrides), show_progress=False) as trainer:
        trainer.train()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="pipelining on CUDA needs two GPUs")
def test_pipeline_with_flex_matches_sdpa(tmp_path):
    """PP 2 (GPipe, microbatches of 2): each stage builds its microbatch's BlockMask in forward."""
    pipeline = [
        "--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule", "GPipe",
        "--parallelism.pipeline_parallel_microbatch_size", "2",
    ]  # fmt: skip
    losses = {}
    for attention in ("auto", "sdpa"):
        (tmp_path / attention).mkdir()
        run_on_ranks(_train_on_ranks, 2, tmp_path / attention, [*pipeline, "--model.attention", attention])
        losses[attention] = [m["loss"] for m in read_metrics(tmp_path / attention / "run")]
    assert json.loads((tmp_path / "auto" / "run" / "env.json").read_text())["layout"]["attention"] == "flex"
    assert len(losses["auto"]) == 3
    assert losses["auto"] == pytest.approx(losses["sdpa"], rel=1e-4)


def test_llama4_chunked_flex_block_masks_match_sdpa_chunk_by_chunk():
    """Llama 4's two block kinds under FlexAttention (a chunked BlockMask on the RoPE blocks, the
    document mask on the NoPE block) against SDPA's chunk-by-chunk calls, forward and backward."""
    args = dataclasses.replace(LLAMA4_FLAVORS["debug"], vocab_size=97, max_seq_len=512, attention_chunk_size=192)
    with torch.device("meta"):
        model = Llama4(args)
    model.init_weights(0, "cuda")
    tokens = torch.randint(0, 96, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    tokens[0, [40, 300]] = 96
    sdpa_masks = model.get_attention_masks(tokens, eos_id=96)
    model.attention_backend = "flex"
    flex_masks = model.get_attention_masks(tokens, eos_id=96)
    assert flex_masks.chunked is not None and flex_masks.chunked.block_mask is not None
    grads = []
    for masks in (sdpa_masks, flex_masks):
        model.zero_grad()
        logits = model(tokens, masks)
        logits.float().square().mean().backward()
        grads.append((logits.detach(), model.layers["0"].attention.wq.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-3, atol=1e-4)
