"""ForwardBackward on the tiny Llama, one process, no trainer: the step's loss is its microbatches'
losses summed in the canonical tree order, gradients accumulate to those of the whole batch, the
forward-only sums are the training losses without the denominator, and loss chunking changes nothing
but memory."""

import pytest
import torch

from lockstep.data.dataset import IGNORE_INDEX
from lockstep.data.loader import Microbatch
from lockstep.parallel.parallelize import BuiltModel
from lockstep.train.forward_backward import ForwardBackward, LossSettings, canonical_gradient_tree
from lockstep.train.loss import PipelineLoss, global_batch_loss
from tests.helpers import tiny_model

VOCAB, SEQ = 97, 8


def _built(seed: int = 0) -> BuiltModel:
    model = tiny_model(VOCAB, SEQ, seed=seed)
    return BuiltModel(parts=[model], param_names=[n for n, _ in model.named_parameters()], flops_per_token=0, args=None)


def _forward_backward(model: BuiltModel, *, chunk_tokens: int = 0, tree: bool = False) -> ForwardBackward:
    settings = LossSettings(
        loss_fn=global_batch_loss, pipeline_loss=PipelineLoss(), chunk_tokens=chunk_tokens, loss_parallel=False,
        document_masking=False, eos_id=0,
    )  # fmt: skip
    gradient_tree = canonical_gradient_tree(model, tree_on_shards=False) if tree else None
    return ForwardBackward(
        model, settings=settings, device=torch.device("cpu"), gradient_tree=gradient_tree, replica_sum=None,
        shard_group=None,
    )  # fmt: skip


def _batch(samples: int) -> Microbatch:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (samples, SEQ + 1), generator=generator)
    labels = tokens[:, 1:].clone()
    labels[0, :3] = IGNORE_INDEX  # tokens without loss: the denominator is the valid count
    return Microbatch(tokens[:, :-1], labels)


def _split(batch: Microbatch) -> list[Microbatch]:
    return [Microbatch(batch.inputs[i : i + 1], batch.labels[i : i + 1]) for i in range(len(batch.inputs))]


def _grads(model: BuiltModel) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parts[0].parameters()]


def test_the_step_loss_is_the_microbatch_losses_summed_pairwise():
    """Four microbatches sum as (l0 + l1) + (l2 + l3), bitwise: the subtree every layout computes."""
    batch, model = _batch(4), _built()
    tokens = batch.num_valid_tokens
    loss = _forward_backward(model).run(_split(batch), tokens)
    with torch.no_grad():
        each = [global_batch_loss(model.parts[0](mb.inputs, None), mb.labels, tokens) for mb in _split(batch)]
    assert loss.shape == (1,) and torch.equal(loss[0], (each[0] + each[1]) + (each[2] + each[3]))


@pytest.mark.parametrize("tree", [False, True])
def test_microbatches_accumulate_the_loss_and_gradients_of_the_whole_batch(tree):
    """Each microbatch's loss is divided by the global valid-token count, so splitting changes only rounding."""
    batch = _batch(4)
    whole_model, split_model = _built(), _built()
    whole = _forward_backward(whole_model).run([batch], batch.num_valid_tokens)
    split = _forward_backward(split_model, tree=tree).run(_split(batch), batch.num_valid_tokens)
    torch.testing.assert_close(split, whole)
    for a, b in zip(_grads(split_model), _grads(whole_model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_gradient_tree_holds_the_canonical_sum_of_the_microbatch_gradients():
    """With the tree, .grad is (g0 + g1) + (g2 + g3) of the microbatches' own gradients, bitwise."""
    batch = _batch(4)
    tokens = batch.num_valid_tokens
    per_microbatch = []
    for mb in _split(batch):
        model = _built()
        _forward_backward(model).run([mb], tokens)
        per_microbatch.append(_grads(model))
    model = _built()
    _forward_backward(model, tree=True).run(_split(batch), tokens)
    for got, (g0, g1, g2, g3) in zip(_grads(model), zip(*per_microbatch, strict=True), strict=True):
        assert torch.equal(got, (g0 + g1) + (g2 + g3))


def test_summed_losses_are_the_training_losses_times_the_token_count_without_gradients():
    batch, model = _batch(2), _built()
    forward_backward = _forward_backward(model)
    summed = forward_backward.summed_losses(_split(batch))
    assert all(p.grad is None for p in model.parts[0].parameters())  # forward only
    tokens = batch.num_valid_tokens
    for mb, loss in zip(_split(batch), summed, strict=True):
        model_loss = _forward_backward(_built()).run([mb], tokens)
        assert loss.dtype == torch.float32 and loss.shape == (1,)
        torch.testing.assert_close(loss / tokens, model_loss)


def test_loss_chunking_gives_the_same_loss_and_gradients():
    batch = _batch(2)
    plain_model, chunked_model = _built(), _built()
    plain = _forward_backward(plain_model).run([batch], batch.num_valid_tokens)
    chunked = _forward_backward(chunked_model, chunk_tokens=5).run([batch], batch.num_valid_tokens)  # chunks of 5 of 16
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(_grads(chunked_model), _grads(plain_model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_without_document_masking_there_are_no_masks():
    assert _forward_backward(_built()).masks(_batch(1).inputs) is None
