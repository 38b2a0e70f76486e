"""Choosing the next token: greedy, or sampled with temperature, top-k and top-p.

Every prompt draws from its own CPU generator, seeded from (seed, the prompt's index), and draws
exactly one uniform number per step by inverse CDF. So a prompt's tokens depend on the seed, its
index and its own logits only: not on which prompts share its batch, nor on the batch size, nor on
the device the model runs on (the draws are made on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lockstep.determinism.seeds import derived_seed
from lockstep.errors import LockstepError


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 64
    """Tokens to generate per prompt at most (fewer when EOS comes first)."""
    greedy: bool = False
    """Take the most likely token every step (temperature, top-k, top-p and seed are then unused)."""
    temperature: float = 1.0
    """Logits are divided by this before sampling; 0 means greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 keeps all."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities sum to top_p (nucleus); 1 keeps all."""
    seed: int = 0
    """Seeds every prompt's generator (with the prompt's index): the same seed gives the same tokens."""

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def validate(self) -> None:
        """Refuse values that would fail or mean nothing, naming the option."""
        if self.max_new_tokens < 1:
            raise LockstepError(f"--max-new-tokens must be at least 1; got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also refuses NaN
            raise LockstepError(f"--temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if self.top_k < 0:
            raise LockstepError(f"--top-k must be >= 0 (0 = all tokens); got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LockstepError(f"--top-p must be in (0, 1] (1 = all tokens); got {self.top_p}")


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of prompt `index` (its position among all prompts of the command)."""
    return torch.Generator().manual_seed(derived_seed(seed, f"generate/prompt_{index}"))


def next_tokens(logits_BV: torch.Tensor, settings: SamplingSettings, generators: list[torch.Generator]) -> list[int]:
    """One token per row from the last position's logits [B, vocab] (any device)."""
    logits = logits_BV.detach().float().cpu()
    if settings.is_greedy:
        return logits.argmax(dim=-1).tolist()
    return [_sample(row, settings, generator) for row, generator in zip(logits, generators, strict=True)]


def _sample(logits_V: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    scores = logits_V / settings.temperature
    if 0 < settings.top_k < scores.numel():
        kth_best = scores.topk(settings.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    probs = scores.softmax(dim=-1).double()
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(descending=True, stable=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= settings.top_p, 0.0)  # the first always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    cdf = probs.cumsum(0)
    draw = torch.rand((), dtype=torch.float64, generator=generator) * cdf[-1]
    # The first token whose cumulative mass exceeds the draw: never one of probability 0.
    index = int(torch.searchsorted(cdf, draw, right=True))
    if index == cdf.numel():  # the draw rounded up to the whole mass
        index = int(probs.nonzero()[-1])
    return index
