"""Chunked local attention (Llama 4's RoPE layers) against the dense reference mask: SDPA chunk by
chunk (with documents, a sequence that is not a whole number of chunks, GQA; forward and gradients),
FlexAttention's block mask, the masks built once per microbatch for both kinds of layers, and the KV
cache's masks across a chunk boundary."""

import pytest
import torch
import torch.nn.functional as F

from lockstep.models.common.attention import attention
from lockstep.models.common.kv_cache import KVCache
from lockstep.models.common.masks import (
    AttentionMasks,
    additive_mask,
    build_attention_masks,
    chunked_block_causal_mask,
    flex_block_mask,
)
from tests.models.common.test_attention import SEQ, _assert_block_mask_is, _document_ids

CHUNK = 100  # not a multiple of FlexAttention's 128 blocks, and SEQ = 384 is not a whole number of chunks


def _qkv(requires_grad: bool = False):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2, h, SEQ, 16, generator=generator).requires_grad_(requires_grad) for h in (4, 2, 2)]


def test_the_dense_reference_is_documents_causality_and_chunks():
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    got = chunked_block_causal_mask(ids, 2)[0, 0].int()
    expected = torch.tensor(
        [[1, 0, 0, 0, 0, 0, 0],
         [1, 1, 0, 0, 0, 0, 0],
         [0, 0, 1, 0, 0, 0, 0],
         [0, 0, 0, 1, 0, 0, 0],
         [0, 0, 0, 0, 1, 0, 0],
         [0, 0, 0, 0, 1, 1, 0],
         [0, 0, 0, 0, 0, 0, 1]]
    )  # fmt: skip
    assert torch.equal(got, expected)


@pytest.mark.parametrize("documents", [True, False], ids=["documents", "plain"])
def test_sdpa_chunk_by_chunk_equals_the_dense_reference_with_gradients(documents):
    document_ids = _document_ids(2) if documents else torch.zeros(2, SEQ, dtype=torch.long)
    masks = build_attention_masks(document_ids, "sdpa", CHUNK) if documents else AttentionMasks()
    chunked = masks.resolve("sdpa", CHUNK, SEQ).for_chunked_layers()
    assert chunked.chunk_size == CHUNK
    if documents:  # never more than one chunk of keys per query
        assert chunked.sdpa_mask.shape == (2, 1, SEQ, CHUNK)
    q, k, v = _qkv(requires_grad=True)
    out = attention(q, k, v, chunked)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    reference_mask = additive_mask(chunked_block_causal_mask(document_ids, CHUNK))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask, enable_gqa=True)
    reference_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_both_layer_kinds_masks_are_built_once_and_skipped_when_one_chunk_holds_the_sequence():
    document_ids = _document_ids(2)
    masks = build_attention_masks(document_ids, "sdpa", CHUNK)
    assert torch.equal(masks.sdpa_mask, additive_mask(chunked_block_causal_mask(document_ids, SEQ)))
    assert masks.chunked is not None and masks.for_chunked_layers() is masks.chunked
    fits = build_attention_masks(document_ids, "sdpa", SEQ)
    assert fits.chunked is None and fits.for_chunked_layers() is fits
    deferred = AttentionMasks(document_ids=document_ids).resolve("sdpa", CHUNK, SEQ)
    assert torch.equal(deferred.chunked.sdpa_mask, masks.chunked.sdpa_mask)


def test_flex_block_mask_is_the_chunked_reference_and_its_forward_matches():
    """The chunked mask_mod, the 128-blocks FlexAttention skips (all outside the chunks) and keeps, and
    the kernel's output (torch 2.13 runs FlexAttention's forward on the CPU, not its backward)."""
    document_ids = _document_ids(2)
    block_mask = flex_block_mask(document_ids, CHUNK)
    _assert_block_mask_is(block_mask, chunked_block_causal_mask(document_ids, CHUNK))
    q, k, v = _qkv()
    with torch.no_grad():
        flex = attention(q, k, v, build_attention_masks(document_ids, "flex", CHUNK).for_chunked_layers())
        sdpa = attention(q, k, v, build_attention_masks(document_ids, "sdpa", CHUNK).for_chunked_layers())
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_kv_cache_masks_cross_a_chunk_boundary_by_position():
    """A padded batch decoding past a chunk boundary: each query sees the real keys of its own chunk,
    counted from its row's first real token, and the full layers still see every real key."""
    chunk, pad_B = 4, torch.tensor([0, 2])
    cache = KVCache(1, pad_B, max_len=12)
    cache.begin(6, chunk)  # the prompt: slots 0..5 (row 1: positions 0..3 after two pads)
    positions, masks = cache.begin(1, chunk)  # slot 6: position 6 in row 0, 4 in row 1
    assert positions.tolist() == [[6], [4]]
    chunked = masks.chunked.sdpa_mask[:, 0, 0]
    assert chunked[0].nonzero().flatten().tolist() == [4, 5, 6]  # positions 4..6: chunk 1
    assert chunked[1].nonzero().flatten().tolist() == [6]  # position 4 starts chunk 1 in row 1
    assert masks.sdpa_mask[1, 0, 0].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
