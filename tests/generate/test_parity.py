"""Greedy generation from our Hugging Face export gives exactly the tokens of transformers'
``generate(do_sample=False)`` on that export (fp32 CPU, eager attention and experts)."""

import os

import pytest
import torch

from lockstep.checkpoint.hf import export_to_hf
from lockstep.generate.loading import load_model, resolve_source
from lockstep.generate.loop import generate
from lockstep.generate.sampling import SamplingSettings
from tests.generate.helpers import PROMPTS, lively_model, save_checkpoint

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"
NEW_TOKENS = 12
HF_CLASSES = {
    "llama3": "LlamaForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",  # the debug flavor ties its embeddings
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama4": "Llama4ForCausalLM",  # chunks of 8: decoding crosses chunk boundaries
}


@pytest.mark.parametrize("name", list(HF_CLASSES))
def test_greedy_tokens_equal_transformers_generate(tmp_path, name):
    step = save_checkpoint(lively_model(name), name, tmp_path / "checkpoint")
    export_to_hf(step, tmp_path / "hf")
    hf_class = getattr(transformers, HF_CLASSES[name])
    hf, info = hf_class.from_pretrained(tmp_path / "hf", local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval().set_attn_implementation("eager")
    if name in ("deepseek_v3", "qwen3_moe"):
        hf.set_experts_implementation("eager")
    if name == "deepseek_v3":
        assert any(m.e_score_correction_bias.any() for m in hf.modules() if hasattr(m, "e_score_correction_bias"))
    ours = load_model(resolve_source(tmp_path / "hf"), torch.device("cpu"))
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS, greedy=True)
    batched = generate(ours, PROMPTS, settings, eos_id=None)
    for prompt, tokens in zip(PROMPTS, batched, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS, pad_token_id=0,
            )  # fmt: skip
        assert tokens == theirs[0, len(prompt) :].tolist()
        assert len(set(tokens)) > 2  # not a model that repeats one token
