"""Attention backends on the CPU: model.attention = auto resolves per device, and FlexAttention's
compiled block mask (built whole or deferred per pipeline microbatch) is the block-causal mask.

The flex tests compile (a few seconds each on 2 cores); torch 2.13 runs FlexAttention's forward on
the CPU, not its backward, so the kernel is compared with SDPA under no_grad.
"""

import re
from unittest import mock

import pytest
import torch
from torch._inductor.graph import GraphLowering
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks
from torch.nn.attention.flex_attention import BlockMask, create_mask

from lockstep.config.errors import ConfigError
from lockstep.config.sections import ModelConfig
from lockstep.models.common.attention import HeadNorm, attention, resolve_attention_backend
from lockstep.models.common.masks import AttentionMasks, block_causal_mask, document_ids_from_tokens, flex_block_mask

SEQ = 384  # three 128-blocks
EOS = 9


def _document_ids(batch: int, seq_len: int = SEQ) -> torch.Tensor:
    """Packed documents of uneven lengths, most crossing 128-block boundaries, one ending on one."""
    tokens = torch.zeros(batch, seq_len, dtype=torch.long)
    ends = [[100, 300], [127, 250], [40, 200, 201], [383]]
    for row in range(batch):
        tokens[row, [e for e in ends[row % len(ends)] if e < seq_len]] = EOS
    return document_ids_from_tokens(tokens, EOS)


def _tiles(dense_BHSS: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, S/block, S/block, block, block] view of a [B, H, S, S] mask."""
    b, h, q, k = dense_BHSS.shape
    return dense_BHSS.reshape(b, h, q // block, block, k // block, block).transpose(3, 4)


def _assert_block_mask_is(block_mask: BlockMask, expected_BHSS: torch.Tensor) -> None:
    """mask_mod over every (q, kv) pair, and the 128-block structure (partial and full blocks)."""
    batch, _, seq_len, _ = expected_BHSS.shape
    assert block_mask.shape == (batch, 1, seq_len, seq_len)
    assert torch.equal(create_mask(block_mask.mask_mod, batch, 1, seq_len, seq_len, device="cpu"), expected_BHSS)
    q_block, kv_block = block_mask.BLOCK_SIZE
    assert q_block == kv_block
    tiles = _tiles(expected_BHSS, q_block)
    assert torch.equal(block_mask.to_dense().bool(), tiles.any(-1).any(-1))  # every block with a pair
    full = BlockMask.from_kv_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, BLOCK_SIZE=q_block)
    assert torch.equal(full.to_dense().bool(), tiles.all(-1).all(-1))  # blocks that skip mask_mod


@pytest.mark.parametrize(
    "setting, device_type, backend",
    [("auto", "cuda", "flex"), ("auto", "cpu", "sdpa"), ("sdpa", "cuda", "sdpa"), ("sdpa", "cpu", "sdpa"),
     ("flex", "cuda", "flex")],
)  # fmt: skip
def test_auto_resolves_per_device(setting, device_type, backend):
    assert resolve_attention_backend(setting, device_type) == backend


def test_flex_is_refused_off_cuda_and_auto_is_the_default():
    with pytest.raises(ConfigError, match="model.attention: FlexAttention has no CPU backward"):
        resolve_attention_backend("flex", "cpu")
    with pytest.raises(ConfigError, match="model.attention"):
        ModelConfig(attention="fast").validate()
    assert ModelConfig().attention == "auto"


def test_flex_block_mask_is_the_block_causal_mask():
    document_ids = _document_ids(2)  # the shape of the tests below: one compile serves all
    _assert_block_mask_is(flex_block_mask(document_ids), block_causal_mask(document_ids))


def test_flex_block_mask_is_compiled_without_a_dense_mask():
    """Inductor's code for a shape no other test builds: no buffer as large as one S x S mask."""
    seq_len = 640
    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        flex_block_mask(_document_ids(1, seq_len))
    assert codes, "create_block_mask did not compile"
    shapes = [re.findall(r"\d+", s) for code in codes for s in re.findall(r"empty_strided_\w+\(\(([^)]*)\)", code)]
    assert shapes and all(torch.Size(map(int, shape)).numel() < seq_len * seq_len for shape in shapes)


def test_flex_forward_on_cpu_matches_sdpa_with_the_dense_mask():
    document_ids = _document_ids(2)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, SEQ, 16, generator=generator) for heads in (4, 2, 2))  # GQA
    with torch.no_grad():
        flex = attention(q, k, v, AttentionMasks(document_ids=document_ids).resolve("flex"))
        sdpa = attention(q, k, v, AttentionMasks(document_ids=document_ids).resolve("sdpa"))
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_deferred_masks_resolve_per_pipeline_microbatch():
    """The schedule splits the deferred document ids; each stage's resolve builds a BlockMask of the
    microbatch's batch size that masks the microbatch's own documents."""
    document_ids = _document_ids(4)
    _, kwargs_split = split_args_kwargs_into_chunks(
        (), {"attention_masks": AttentionMasks(document_ids=document_ids)}, 2
    )
    assert len(kwargs_split) == 2
    for i, kwargs in enumerate(kwargs_split):
        microbatch_ids = document_ids[2 * i : 2 * i + 2]
        deferred = kwargs["attention_masks"]
        assert deferred.block_mask is None and torch.equal(deferred.document_ids, microbatch_ids)
        resolved = deferred.resolve("flex")
        assert resolved.sdpa_mask is None and resolved.document_ids is None
        _assert_block_mask_is(resolved.block_mask, block_causal_mask(microbatch_ids))
        assert deferred.resolve("sdpa").sdpa_mask.shape == (2, 1, SEQ, SEQ)


def test_a_built_block_mask_survives_a_pipeline_split():
    """Not the path lockstep takes (it defers), but a BlockMask split by pytree is still each
    microbatch's own mask: its captured document ids are leaves, split with the block tables."""
    document_ids = _document_ids(4)
    whole = AttentionMasks(block_mask=flex_block_mask(document_ids))
    _, kwargs_split = split_args_kwargs_into_chunks((), {"attention_masks": whole}, 2)
    for i, kwargs in enumerate(kwargs_split):
        _assert_block_mask_is(kwargs["attention_masks"].block_mask, block_causal_mask(document_ids[2 * i : 2 * i + 2]))


def test_head_norm_is_rms_norm_over_each_head():
    norm = HeadNorm(8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 3, 4, 8)
    reference = torch.nn.RMSNorm(8, eps=1e-6)
    reference.weight.data.copy_(norm.weight.data)
    torch.testing.assert_close(norm(x), reference(x), rtol=1e-6, atol=1e-6)
