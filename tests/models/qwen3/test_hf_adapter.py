"""Qwen3 export and import refusals: a moved routing bias, unsupported configs."""

import dataclasses

import pytest

from lockstep.models.qwen3 import QWEN3_FLAVORS, QWEN3_MOE_FLAVORS, hf_adapter
from tests.models.qwen3.helpers import VOCAB, tiny


def test_a_moved_routing_bias_is_not_exported():
    model = tiny(moe=True)
    model.layers["1"].moe.expert_bias[3] = 0.5
    with pytest.raises(ValueError, match="layers.1.moe.expert_bias is not zero"):
        hf_adapter.to_hf(model.state_dict(), model.args)


def test_unsupported_hf_configs_are_refused():
    config = hf_adapter.hf_config(dataclasses.replace(QWEN3_FLAVORS["debug"], vocab_size=VOCAB))
    for change, fragment in (
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
        ({"use_sliding_window": True}, "sliding-window"),
    ):
        with pytest.raises(ValueError, match=fragment):
            hf_adapter.args_from_hf_config(config | change)
    moe = hf_adapter.hf_config(dataclasses.replace(QWEN3_MOE_FLAVORS["debug"], vocab_size=VOCAB))
    with pytest.raises(ValueError, match="dense blocks"):
        hf_adapter.args_from_hf_config(moe | {"mlp_only_layers": [0]})
