"""The decoding loop: prompts in, generated token ids out, one step at a time.

Prompts of different lengths are left-padded into one batch, so all rows decode in step; the KV
cache (lockstep.models.common.kv_cache) masks the padding and gives every row its own positions.
A row stops at EOS (which it keeps) or after max_new_tokens; the batch runs until every row stops,
and the tokens a stopped row is still fed are never part of its output. Without the cache, every
step runs the whole sequence through the model again (the baseline the cache is measured against).

Runs under inference_mode with MoE token counting paused: decoding must not move the router's balancing
bias (lockstep.models.common.moe).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lockstep.generate.sampling import SamplingSettings, next_tokens, prompt_generator
from lockstep.models.common.kv_cache import KVCache
from lockstep.models.common.moe import token_counting_paused

PAD_ID = 0
"""Fills the left padding; any id would do, padding is masked out."""

OnTokens = Callable[[list[tuple[int, int]]], None]
"""Called after every step with (row, token) for each row still generating."""


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    settings: SamplingSettings,
    eos_id: int | None,
    first_index: int = 0,
    use_cache: bool = True,
    on_tokens: OnTokens | None = None,
) -> list[list[int]]:
    """The generated ids of each prompt (EOS included when it came). `first_index` is the index of
    prompts[0] among all prompts of the command: it picks each prompt's sampling generator, so the
    same prompt draws the same tokens however the prompts are batched."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.tok_embeddings.weight.device
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    tokens_BT = torch.tensor([[PAD_ID] * pad + p for pad, p in zip(pads, prompts, strict=True)], device=device)
    pad_B = torch.tensor(pads, device=device)
    generators = [prompt_generator(settings.seed, first_index + i) for i in range(len(prompts))]
    n_layers, max_len = model.args.n_layers, longest + settings.max_new_tokens
    cache = KVCache(n_layers, pad_B, max_len) if use_cache else None
    generated: list[list[int]] = [[] for _ in prompts]
    running = set(range(len(prompts)))
    step_input = tokens_BT
    with token_counting_paused():
        for _ in range(settings.max_new_tokens):
            if use_cache:
                logits = model(step_input, kv_cache=cache)
            else:  # recompute everything: a fresh cache the length of the sequence, filled in one pass
                logits = model(tokens_BT, kv_cache=KVCache(n_layers, pad_B, tokens_BT.shape[1]))
            chosen = next_tokens(logits[:, -1], settings, generators)
            emitted = [(row, chosen[row]) for row in sorted(running)]
            for row, token in emitted:
                generated[row].append(token)
                if token == eos_id:
                    running.discard(row)
            if on_tokens is not None:
                on_tokens(emitted)
            if not running:
                break
            step_input = torch.tensor(chosen, device=device)[:, None]
            if not use_cache:
                tokens_BT = torch.cat([tokens_BT, step_input], dim=1)
    return generated
