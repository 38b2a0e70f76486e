"""DeepSeek-V3: forced balance, YaRN, Hugging Face parity."""

import dataclasses
import math
import os

import pytest
import torch

from lockstep.models.common.rope import YarnRopeScaling
from lockstep.models.deepseek_v3 import DEEPSEEK_V3_FLAVORS, DeepSeekV3, hf_adapter

ARGS = dataclasses.replace(DEEPSEEK_V3_FLAVORS["debug"], vocab_size=97, max_seq_len=32, route_scale=2.5)


def test_forced_load_balance_gives_every_expert_the_same_count():
    with torch.device("meta"):
        model = DeepSeekV3(ARGS)
    model.init_weights(0, "cpu")
    model.set_force_load_balance(True)
    model(torch.randint(0, 97, (2, 32)))  # 64 tokens x top-2 over 8 experts
    for moe in model.moe_modules():
        assert moe.tokens_per_expert.tolist() == [16.0] * 8


YARN = dataclasses.replace(
    ARGS, rope_scaling=YarnRopeScaling(factor=4.0, original_max_position_embeddings=8, mscale=0.7, mscale_all_dim=1.0)
)
"""YaRN over 4x the original 8 positions, with unequal mscales so both corrections (cos/sin and softmax) act."""


@pytest.mark.parametrize("args", [ARGS, YARN], ids=["plain-rope", "yarn"])
def test_imported_model_gives_transformers_logits_and_round_trips(args):
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    config = {
        k: v for k, v in hf_adapter.hf_config(args).items() if k not in ("architectures", "model_type", "torch_dtype")
    }
    assert hf_adapter.args_from_hf_config(hf_adapter.hf_config(args)) == dataclasses.replace(args, max_seq_len=32)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**config)).eval()
    hf.set_attn_implementation("eager")
    hf.set_experts_implementation("eager")
    with torch.no_grad():  # HF initialises the router and its bias to zero: randomise so routing matters
        for name, p in hf.named_parameters():
            if "gate.weight" in name or "experts" in name:
                p.normal_(0, 0.05)
        for module in hf.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.1)
    with torch.device("meta"):
        ours = DeepSeekV3(args)
    ours.init_weights(0, "cpu")
    ours.load_state_dict(hf_adapter.from_hf(hf.state_dict(), args), strict=True)
    tokens = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens), hf(tokens).logits, rtol=0, atol=1e-5)
    per_expert = hf_adapter.to_hf(ours.state_dict(), args)  # the on-disk layout: one tensor per expert
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in per_expert
    back = hf_adapter.from_hf(per_expert, args)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_yarn_changes_the_logits_and_the_671b_flavor_has_deepseek_v3s_settings():
    """Not a no-op: the same weights give other logits with YaRN (frequencies and softmax scale), and
    the published flavor carries DeepSeek-V3's rope_scaling (factor 40 over 4096 positions, mscale 1)."""
    outputs = []
    for args in (ARGS, YARN):
        with torch.device("meta"):
            model = DeepSeekV3(args)
        model.init_weights(0, "cpu")
        outputs.append(model.eval()(torch.arange(32).reshape(1, 32) % 97))
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)
    scaling = DEEPSEEK_V3_FLAVORS["671B"].rope_scaling
    assert (scaling.factor, scaling.original_max_position_embeddings, scaling.mscale_all_dim) == (40.0, 4096, 1.0)
    assert abs(DEEPSEEK_V3_FLAVORS["671B"].softmax_scale - 192**-0.5 * (0.1 * math.log(40) + 1) ** 2) < 1e-12
