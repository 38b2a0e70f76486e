"""The training loss: token cross-entropy summed over valid tokens, divided by the valid-token count
of the whole global batch. Summing these over microbatches (and, later, ranks) therefore gives the
loss, and the gradient, of the one big batch.

Under tensor parallelism with parallelism.loss_parallel the logits arrive as a DTensor sharded over
the vocabulary; inside torch's ``loss_parallel()`` context (which the trainer holds around forward
and backward) ``F.cross_entropy`` runs on the shards, and the loss comes back a replicated DTensor,
returned here as a plain tensor so that the reductions after it never see DTensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import register_dataclass
from torch.utils.checkpoint import checkpoint

from lockstep.data.dataset import IGNORE_INDEX


def summed_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """fp32 sum of token cross-entropies, IGNORE_INDEX labels excluded; vocab-sharded DTensor logits
    (under loss_parallel) give the replicated sum as this rank's plain tensor."""
    loss = F.cross_entropy(
        logits_BSV.flatten(0, 1).float(), labels_BS.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
    )
    return loss.to_local() if isinstance(loss, DTensor) else loss


def global_batch_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, global_valid_tokens: int) -> torch.Tensor:
    return summed_cross_entropy(logits_BSV, labels_BS) / global_valid_tokens


def _chunk_summed_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    """One run's summed cross-entropy. It takes the weight, not the module, so that calling it once per
    run (and again in backward) runs no module hooks: to FSDP, `output` is used once, by the root."""
    return summed_cross_entropy(F.linear(h_ND, weight_VD).unsqueeze(0), labels_N.unsqueeze(0))


def chunked_global_batch_loss(
    h_BSD: torch.Tensor,
    output: nn.Linear,
    labels_BS: torch.Tensor,
    global_valid_tokens: int,
    chunk_tokens: int,
) -> torch.Tensor:
    """`global_batch_loss(output(h_BSD), ...)` without ever holding the [B, S, V] logits: the tokens are
    cut into runs of `chunk_tokens` (flattened batch order), each run's logits live only while its
    cross-entropy is taken, and backward recomputes them one run at a time (activation checkpointing
    per run). The fp32 run sums are added left to right, a fixed order that depends only on the
    microbatch, so every layout gets the same bits; against the unchunked loss only the summation
    order differs (rounding, about 1e-7 relative). Called inside the model's forward, so FSDP's root
    holds the unsharded `output.weight` while it runs."""
    h_chunks = h_BSD.flatten(0, 1).split(chunk_tokens)  # split, not slicing: one cat in backward
    label_chunks = labels_BS.flatten().split(chunk_tokens)
    total = None
    for h_ND, labels_N in zip(h_chunks, label_chunks, strict=True):
        chunk = checkpoint(
            _chunk_summed_cross_entropy, h_ND, output.weight, labels_N, use_reentrant=False, preserve_rng_state=False
        )
        total = chunk if total is None else total + chunk
    return total / global_valid_tokens


@dataclass
class ChunkedLossHead:
    """The decoder's `head` for training.loss_chunk_tokens: the microbatch's loss in place of its logits.
    A pytree node whose labels are its only tensor, so a pipeline schedule given it as a forward kwarg
    splits the labels by microbatch with the tokens (and replicates the two counts): the last stage's
    forward then returns the microbatch loss, and no stage ever holds [B, S, vocab] logits."""

    labels_BS: torch.Tensor
    global_valid_tokens: int
    chunk_tokens: int

    def __call__(self, h_BSD: torch.Tensor, output: nn.Linear) -> torch.Tensor:
        return chunked_global_batch_loss(h_BSD, output, self.labels_BS, self.global_valid_tokens, self.chunk_tokens)


register_dataclass(ChunkedLossHead)


class PipelineLoss:
    """The loss a pipeline schedule calls as loss_fn(logits, labels) per microbatch; the trainer sets
    the global valid-token count before each step. With `chunk_tokens` the last stage's forward has
    already taken the loss (`head`), so it passes that through."""

    def __init__(self, loss_fn=global_batch_loss, chunk_tokens: int = 0) -> None:
        self.loss_fn = loss_fn
        self.chunk_tokens = chunk_tokens
        self.global_tokens = 1

    def head(self, labels_BS: torch.Tensor) -> ChunkedLossHead | None:
        """The forward kwarg that makes the last stage return the chunked loss; None without chunking."""
        if not self.chunk_tokens:
            return None
        return ChunkedLossHead(labels_BS, self.global_tokens, self.chunk_tokens)

    def __call__(self, output: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        if self.chunk_tokens:
            return output  # the microbatch loss, computed by the last stage's forward
        return self.loss_fn(output, labels_BS, self.global_tokens)
