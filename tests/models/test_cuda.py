"""CUDA-only paths: FlexAttention and deterministic GPU training. Skipped where there is no GPU
(CI never has one); run on a GPU machine with `pytest tests/models/test_cuda.py`."""

import pytest
import torch

from lockstep.models.common.attention import AttentionMasks
from lockstep.train.run_folder import read_metrics
from lockstep.train.trainer import Trainer
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
