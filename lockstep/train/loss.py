"""The training loss: token cross-entropy summed over valid tokens, divided by the valid-token count
of the whole global batch. Summing these over microbatches (and, later, ranks) therefore gives the
loss, and the gradient, of the one big batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lockstep.data.dataset import IGNORE_INDEX


def summed_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """fp32 sum of token cross-entropies, IGNORE_INDEX labels excluded."""
    return F.cross_entropy(
        logits_BSV.flatten(0, 1).float(), labels_BS.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
    )


def global_batch_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, global_valid_tokens: int) -> torch.Tensor:
    return summed_cross_entropy(logits_BSV, labels_BS) / global_valid_tokens


class PipelineLoss:
    """The loss a pipeline schedule calls as loss_fn(logits, labels) per microbatch; the trainer sets
    the global valid-token count before each step."""

    def __init__(self, loss_fn=global_batch_loss) -> None:
        self.loss_fn = loss_fn
        self.global_tokens = 1

    def __call__(self, logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits_BSV, labels_BS, self.global_tokens)
