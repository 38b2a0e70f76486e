"""Document ids from EOS tokens and the block-causal mask they give."""

import torch

from lockstep.models.common.masks import block_causal_mask, document_ids_from_tokens


def test_document_ids_and_block_causal_mask():
    tokens = torch.tensor([[5, 9, 1, 4, 9, 9, 2]])
    doc_ids = document_ids_from_tokens(tokens, eos_id=9)
    assert doc_ids.tolist() == [[0, 0, 1, 1, 1, 2, 3]]
    mask = block_causal_mask(doc_ids)[0, 0]
    assert mask[4].tolist() == [False, False, True, True, True, False, False]
    assert mask[5].tolist() == [False] * 5 + [True, False]
