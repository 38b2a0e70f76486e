"""The decoder property every family's model test checks: logits before a position do not change when a
later token does (and, as a control, the later logits do)."""

from __future__ import annotations

import torch


def logits_around_a_changed_token(
    model: torch.nn.Module, vocab: int, at: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on 2 x 32 seeded tokens, and on the same tokens with the one at `at` changed."""
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, at] = (changed[:, at] + 1) % vocab
    with torch.no_grad():
        return model(tokens), model(changed)
