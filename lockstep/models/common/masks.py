"""The masks attention takes, built once per microbatch from the document ids of packed sequences.

SDPA takes an additive [B, 1, S, S] block-causal mask (or none: plain causal); FlexAttention takes a
BlockMask built from the same document ids, compiled, so no [B, 1, S, S] tensor exists. A mask is
passed into ``forward``; nothing is cached on a module, so a microbatch can never see another's mask.

Chunked local attention (Llama 4's RoPE layers: a query sees only keys of its own chunk of
``chunk_size`` positions, chunks counted from position 0) is a second set of masks carried in
``AttentionMasks.chunked`` and built in the same pass, so a model with two kinds of layers builds two
masks per microbatch, not one per layer. Under SDPA the chunked masks never span more than one chunk:
attention runs chunk by chunk (``chunk_size`` set), with at most a [B, 1, S, chunk] document mask.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils._pytree import register_dataclass


@dataclass
class AttentionMasks:
    """What one microbatch's attention calls need: an SDPA mask, a FlexAttention BlockMask, or the
    document ids to build either from (deferred).

    All None means plain causal attention (no document boundaries).
    """

    sdpa_mask: torch.Tensor | None = None
    """Additive float mask [B, 1, S, S] (0 = attend, -inf = not)."""
    block_mask: BlockMask | None = None
    """FlexAttention's [B, 1, S, S] mask in 128x128 blocks (see ``flex_block_mask``)."""
    document_ids: torch.Tensor | None = None
    """Deferred: the [B, S] document ids from which the model builds the mask when its forward starts
    (``resolve``). A pipeline schedule splits these per microbatch, so each stage builds one
    microbatch's mask ([b, 1, S, S], or a BlockMask of batch b) at a time instead of receiving the
    whole rank batch's."""
    chunk_size: int | None = None
    """Attention runs within consecutive chunks of this many positions, one SDPA call per chunk;
    ``sdpa_mask``, if any, is then [B, 1, S, chunk_size]: each query's row over its own chunk's keys
    (``chunk_rows``). None: one call over the whole sequence."""
    chunked: AttentionMasks | None = None
    """The masks of the layers with chunked local attention (``for_chunked_layers``)."""

    def resolve(self, backend: str, chunk_size: int | None = None, seq_len: int = 0) -> AttentionMasks:
        """The masks to attend with: built from the document ids when deferred, else these; with
        `chunk_size` (a model with chunked layers) the chunked layers' masks are added when missing."""
        if self.document_ids is not None:
            return build_attention_masks(self.document_ids, backend, chunk_size)
        if chunk_size is None or self.chunked is not None or seq_len <= chunk_size:
            return self
        return dataclasses.replace(self, chunked=AttentionMasks(chunk_size=chunk_size))

    def for_chunked_layers(self) -> AttentionMasks:
        """What a layer with chunked attention takes: its own masks, or these when the sequence fits in
        one chunk (then chunking changes nothing)."""
        return self.chunked if self.chunked is not None else self


# A pytree node, so a pipeline schedule splits the deferred document ids by microbatch along with
# the tokens (pipelining always defers, see flex_block_mask).
register_dataclass(AttentionMasks)


def document_ids_from_tokens(tokens_BS: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document index of each position: a new document starts after every EOS token."""
    is_eos = (tokens_BS == eos_id).to(torch.int32)
    starts = torch.cumsum(is_eos, dim=1) - is_eos
    return starts


def block_causal_mask(document_ids_BS: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S]: query i sees key j iff j <= i and both lie in the same document."""
    seq_len = document_ids_BS.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids_BS.device).tril()
    same_document = document_ids_BS[:, :, None] == document_ids_BS[:, None, :]
    return (same_document & causal)[:, None]


def chunked_block_causal_mask(document_ids_BS: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Boolean [B, 1, S, S]: ``block_causal_mask`` and both positions in one chunk of `chunk_size`.
    The dense reference; attention itself never builds it (``chunk_rows``, ``flex_block_mask``)."""
    positions = torch.arange(document_ids_BS.shape[1], device=document_ids_BS.device) // chunk_size
    return block_causal_mask(document_ids_BS) & (positions[:, None] == positions[None, :])


def chunk_rows(document_ids_BS: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Boolean [B, 1, S, chunk]: row i allows key j of its own chunk (position chunk start + j) iff
    j <= i's offset in the chunk and both lie in one document. Columns past a short last chunk's end
    are never read. S x chunk instead of S x S."""
    batch, seq_len = document_ids_BS.shape
    device = document_ids_BS.device
    query = torch.arange(seq_len, device=device)
    key = (query // chunk_size * chunk_size)[:, None] + torch.arange(chunk_size, device=device)[None, :]
    causal = key <= query[:, None]
    keys_ids = document_ids_BS[:, key.clamp_max(seq_len - 1)]  # [B, S, chunk]
    return (causal[None] & (keys_ids == document_ids_BS[:, :, None]))[:, None]


def build_attention_masks(
    document_ids_BS: torch.Tensor | None, backend: str, chunk_size: int | None = None
) -> AttentionMasks:
    """The masks of one microbatch; with `chunk_size`, those of the chunked layers too (in ``chunked``)
    when the sequence is longer than one chunk."""
    if document_ids_BS is None:
        return AttentionMasks()
    if backend == "flex":
        masks = AttentionMasks(block_mask=flex_block_mask(document_ids_BS))
    else:
        masks = AttentionMasks(sdpa_mask=additive_mask(block_causal_mask(document_ids_BS)))
    if chunk_size is None or document_ids_BS.shape[1] <= chunk_size:
        return masks
    if backend == "flex":
        masks.chunked = AttentionMasks(block_mask=flex_block_mask(document_ids_BS, chunk_size))
    else:
        masks.chunked = AttentionMasks(
            sdpa_mask=additive_mask(chunk_rows(document_ids_BS, chunk_size)), chunk_size=chunk_size
        )
    return masks


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """0 where attention is allowed, -inf elsewhere. SDPA turns a boolean mask into this form inside
    every call and saves that copy for backward, once per layer; converting once per microbatch lets
    all layers share one tensor (at seq 2048, batch 8: 128 MiB instead of 128 MiB per layer)."""
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf"))


def document_causal_mask_mod(document_ids_BS: torch.Tensor) -> Callable:
    """FlexAttention's mask_mod of ``block_causal_mask``: the same rule, one (q, kv) pair at a time.

    Every call returns a closure of the same code object, so the compiled ``create_block_mask``
    reuses one graph for every microbatch of a shape (dynamo guards on the code, and lifts the
    captured ids to a graph input)."""

    def document_causal(b, h, q_idx, kv_idx):
        same_document = document_ids_BS[b, q_idx] == document_ids_BS[b, kv_idx]
        return same_document & (q_idx >= kv_idx)

    return document_causal


def chunked_document_causal_mask_mod(document_ids_BS: torch.Tensor, chunk_size: int) -> Callable:
    """The mask_mod of ``chunked_block_causal_mask``. FlexAttention skips every 128x128 block outside
    the chunks, so a chunked layer costs S x chunk, not S x S."""

    def chunked_document_causal(b, h, q_idx, kv_idx):
        same_document = document_ids_BS[b, q_idx] == document_ids_BS[b, kv_idx]
        return same_document & (q_idx >= kv_idx) & (q_idx // chunk_size == kv_idx // chunk_size)

    return chunked_document_causal


@functools.cache
def _compiled_create_block_mask():
    """torch 2.13's way to compile it (its ``_compile=True`` flag is deprecated and does this).

    Eager, create_block_mask evaluates mask_mod into a dense [B, 1, S, S] bool tensor (torch's
    create_mask) and only then reduces it to 128x128 blocks; compiled, inductor fuses the evaluation
    into the block reductions, so only [B, 1, S/128, S/128] buffers are allocated (tested). Static
    shapes: one graph per (batch, seq) shape, and a run has one or two."""
    return torch.compile(create_block_mask, dynamic=False)


def flex_block_mask(document_ids_BS: torch.Tensor, chunk_size: int | None = None) -> BlockMask:
    """The BlockMask of one (micro)batch's documents: [B, 1, S, S] in blocks, shared by all heads.

    Under pipelining the model builds it inside the stage's forward from the microbatch's own
    document ids (``AttentionMasks.resolve``), so no whole-batch mask is built. A built BlockMask
    would survive a split too (torch 2.13 lifts the ids the mask_mod captures into pytree leaves and
    splits them along the batch dim with the block tables; tested), but the ids are what travel."""
    batch, seq_len = document_ids_BS.shape
    if chunk_size is None:
        mask_mod = document_causal_mask_mod(document_ids_BS)
    else:
        mask_mod = chunked_document_causal_mask_mod(document_ids_BS, chunk_size)
    return _compiled_create_block_mask()(mask_mod, batch, None, seq_len, seq_len, device=document_ids_BS.device)
