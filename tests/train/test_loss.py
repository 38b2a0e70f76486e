"""The chunked projection-plus-cross-entropy (training.loss_chunk_tokens): the same loss and gradients
as the full logits up to summation order, and still bitwise across layouts."""

import pytest
import torch

from lockstep.config import validate_job_config
from lockstep.config.errors import ConfigError
from lockstep.data.dataset import IGNORE_INDEX
from lockstep.train.loss import chunked_global_batch_loss, global_batch_loss
from lockstep.train.trainer import Trainer
from tests.distributed import run_on_ranks
from tests.helpers import merged_rank_weights, save_rank_weights, tiny_config, tiny_model
from tests.parallel.test_layouts import DETERMINISTIC, _result


def _loss_and_grads(chunk_tokens: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 97, (2, 32), generator=generator)
    labels = torch.randint(0, 97, (2, 32), generator=generator)
    labels[0, :5] = IGNORE_INDEX
    valid = int((labels != IGNORE_INDEX).sum())
    if chunk_tokens:
        head = lambda h, output: chunked_global_batch_loss(h, output, labels, valid, chunk_tokens)  # noqa: E731
        loss = model(tokens, head=head)
    else:
        loss = global_batch_loss(model(tokens), labels, valid)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_tokens", [7, 16, 64, 1000])  # ragged last chunk, even, one chunk, larger
def test_chunked_loss_and_gradients_match_full_logits(chunk_tokens):
    loss, grads = _loss_and_grads(0)
    chunked_loss, chunked_grads = _loss_and_grads(chunk_tokens)
    assert torch.allclose(chunked_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        scale = grad.abs().max()
        assert (chunked_grads[name] - grad).abs().max() <= 1e-6 * scale, name


@pytest.mark.parametrize(
    "overrides",
    [
        ["--training.loss_chunk_tokens", "-1"],
        ["--training.loss_chunk_tokens", "64", "--parallelism.tensor_parallel_degree", "2"],
    ],
    ids=["negative", "tensor-parallel"],  # pipelines take it (tests/parallel/test_loss_parallel.py)
)
def test_chunked_loss_config_is_refused_where_unsupported(tmp_path, overrides):
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        validate_job_config(tiny_config(tmp_path, *overrides), world_size=2)


def _train(folder, overrides: list[str]) -> None:
    with Trainer(tiny_config(folder, *overrides), show_progress=False) as trainer:
        trainer.train()
        save_rank_weights(trainer, folder)


CHUNKED = [*DETERMINISTIC, "--training.steps", "3", "--training.loss_chunk_tokens", "24"]


def test_chunked_loss_fsdp2_is_bitwise_identical_to_one_process(tmp_path):
    """The chunk sums are added in a fixed order inside the root's forward, so FSDP 2 reproduces the
    one-process run bit for bit, and chunking differs from the full logits only by rounding."""
    (tmp_path / "one").mkdir()
    (tmp_path / "fsdp2").mkdir()
    (tmp_path / "full").mkdir()
    _train(tmp_path / "one", CHUNKED)
    run_on_ranks(_train, 2, tmp_path / "fsdp2", CHUNKED)
    _train(tmp_path / "full", [*CHUNKED, "--training.loss_chunk_tokens", "0"])
    (metrics, weights), (reference, reference_weights) = _result(tmp_path / "fsdp2"), _result(tmp_path / "one")
    assert len(metrics) == 3 and metrics == reference
    assert all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights)
    full, _ = _result(tmp_path / "full")
    assert all(abs(m[1] - f[1]) <= 1e-6 * abs(f[1]) for m, f in zip(metrics, full, strict=True))
    assert merged_rank_weights(tmp_path / "one").keys() == weights.keys()
