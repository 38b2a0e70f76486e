"""Keys and values kept across decoding steps, for single-device inference (``lockstep generate``).

A batch of prompts is left-padded to one length, so every row's newest token sits in the same cache
slot and one fill index serves all rows and layers. Everything that depends on the padding is a
function of the slot indices and each row's pad count: the RoPE position of slot j in row b is
j - pad[b] (pads get 0: their outputs are never read), and a query in slot i sees key slot j iff
j <= i and j is not a pad. A pad query also sees itself, so no softmax row is empty: an all-masked
row would be NaN, and a NaN in a pad's values would leak through 0-weights into the real rows.
A first pass over unpadded prompts is plain causal attention, the training forward's own call.

Each attention layer caches what it attends with: Llama its (grouped) k/v heads, DeepSeek-V3's
multi-head latent attention the decompressed per-head k/v (simple and exact; caching the latent
instead would store less and recompute the up-projection every step).

The training forward takes no cache and is untouched by this module.
"""

from __future__ import annotations

import torch

from lockstep.models.common.masks import AttentionMasks


class LayerCache:
    """One attention layer's keys and values, [B, H, max_len, D] each, allocated on first use (their
    head count, head dim and dtype are the layer's)."""

    def __init__(self, owner: KVCache) -> None:
        self.owner = owner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k/v in the slots the owner opened (``KVCache.begin``); return every
        filled slot's k/v, the new ones included, to attend over."""
        start, end = self.owner.start, self.owner.length
        if self.k is None:
            batch, heads, _, _ = k_BHSD.shape
            self.k = k_BHSD.new_empty(batch, heads, self.owner.max_len, k_BHSD.shape[3])
            self.v = v_BHSD.new_empty(batch, heads, self.owner.max_len, v_BHSD.shape[3])
        self.k[:, :, start:end] = k_BHSD
        self.v[:, :, start:end] = v_BHSD
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    def __init__(self, n_layers: int, pad_B: torch.Tensor, max_len: int) -> None:
        """`pad_B`: each row's left padding (slots before its first real token); `max_len`: slots
        (prompt plus generated tokens) the cache can hold."""
        self.pad_B = pad_B
        self.padded = bool(pad_B.any())
        self.max_len = max_len
        self.start = 0
        """First slot of the tokens being added (set by ``begin``)."""
        self.positions_BS = torch.zeros(len(pad_B), 0, dtype=torch.long, device=pad_B.device)
        """Positions of the tokens being added (set by ``begin``)."""
        self.length = 0
        """Filled slots, the ones being added included."""
        self.layers = [LayerCache(self) for _ in range(n_layers)]

    def begin(self, new_tokens: int, chunk_size: int | None = None) -> tuple[torch.Tensor, AttentionMasks]:
        """Open the next `new_tokens` slots (the decoder calls this once per forward, before its
        layers write them); returns their RoPE positions [B, S] (kept as ``positions_BS`` for layers
        that scale by position) and the attention masks. `chunk_size` (Llama 4): the masks carry
        those of the chunked layers too, where a query sees only keys whose positions share its chunk."""
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {self.length} + {new_tokens} do not fit")
        self.start, self.length = self.length, self.length + new_tokens
        device = self.pad_B.device
        if self.start == 0 and not self.padded and (chunk_size is None or new_tokens <= chunk_size):
            # A prompt in one pass: plain causal, as in training.
            self.positions_BS = torch.arange(new_tokens, device=device).expand(len(self.pad_B), -1)
            return self.positions_BS, AttentionMasks()
        query_at = torch.arange(self.start, self.length, device=device)
        key_at = torch.arange(self.length, device=device)
        self.positions_BS = (query_at[None, :] - self.pad_B[:, None]).clamp_min(0)
        real_key_BT = key_at[None, :] >= self.pad_B[:, None]
        causal_ST = key_at[None, :] <= query_at[:, None]
        itself_ST = key_at[None, :] == query_at[:, None]
        allowed = causal_ST[None] & (real_key_BT[:, None, :] | itself_ST[None])  # [B, S, T]
        # Boolean, so it suits any dtype the model runs in (SDPA turns it into -inf where False).
        masks = AttentionMasks(sdpa_mask=allowed[:, None])
        if chunk_size is not None:
            key_positions_BT = (key_at[None, :] - self.pad_B[:, None]).clamp_min(0)
            same_chunk = self.positions_BS[:, :, None] // chunk_size == key_positions_BT[:, None, :] // chunk_size
            masks.chunked = AttentionMasks(sdpa_mask=(allowed & (same_chunk | itself_ST[None]))[:, None])
        return self.positions_BS, masks
