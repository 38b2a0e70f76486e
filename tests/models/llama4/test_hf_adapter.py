"""Llama 4 checkpoints: per-expert and multimodal folders, a moved routing bias, irregular patterns."""

import pytest
import torch

from lockstep.models.llama4 import hf_adapter
from tests.models.llama4.helpers import _meta, tiny_args, tiny_hf_llama4


def test_per_expert_and_multimodal_folders_read_as_the_fused_text_model():
    """One tensor per expert (as quantised re-uploads store them) and the ``language_model.`` names of a
    Llama4ForConditionalGeneration folder, whose vision tower is skipped, give the same weights."""
    hf, args = tiny_hf_llama4()
    fused = hf.state_dict()
    expected = hf_adapter.from_hf(fused, args)
    per_expert = {}
    for name, value in fused.items():
        if name.endswith("experts.gate_up_proj"):
            prefix, hidden = name.removesuffix("gate_up_proj"), value.shape[2] // 2
            for e in range(value.shape[0]):
                per_expert[f"{prefix}{e}.gate_proj.weight"] = value[e, :, :hidden].T
                per_expert[f"{prefix}{e}.up_proj.weight"] = value[e, :, hidden:].T
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            per_expert |= {f"{prefix}{e}.down_proj.weight": value[e].T for e in range(value.shape[0])}
        else:
            per_expert[name] = value
    multimodal = {f"language_model.{k}": v for k, v in fused.items()} | {
        "vision_model.patch_embedding.weight": torch.ones(2)
    }
    for state in (per_expert, multimodal):
        got = hf_adapter.from_hf(state, args)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    nested = {"model_type": "llama4", "text_config": hf.config.to_dict()}
    assert hf_adapter.args_from_hf_config(nested) == args


def test_a_moved_routing_bias_is_not_exported_and_irregular_patterns_are_refused():
    model = _meta(tiny_args())
    model.init_weights(0, "cpu")
    model.layers["1"].moe.expert_bias[2] = 0.5
    with pytest.raises(ValueError, match="layers.1.moe.expert_bias is not zero"):
        hf_adapter.to_hf(model.state_dict(), model.args)
    config = hf_adapter.hf_config(tiny_args())
    with pytest.raises(ValueError, match="moe_layers"):
        hf_adapter.args_from_hf_config(config | {"moe_layers": [0, 3]})
    with pytest.raises(ValueError, match="NoPE"):
        hf_adapter.args_from_hf_config(config | {"no_rope_layers": [0, 1, 1, 1]})
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        hf_adapter.args_from_hf_config(config | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
