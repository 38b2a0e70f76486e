"""The decoding loop on tiny models: the KV cache changes nothing, seeds repeat, batches equal single
prompts, decoding leaves the MoE router's balancing alone."""

import pytest
import torch

from lockstep.errors import LockstepError
from lockstep.generate.loop import generate
from lockstep.generate.sampling import SamplingSettings
from lockstep.models.common.kv_cache import KVCache
from tests.generate.helpers import PROMPTS, lively_model

GREEDY = SamplingSettings(max_new_tokens=8, greedy=True)
SAMPLED = SamplingSettings(max_new_tokens=8, temperature=0.9, top_k=50, top_p=0.95, seed=5)
FAMILIES = ["llama3", "deepseek_v3", "llama4"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return lively_model(request.param)


@torch.no_grad()
def test_cache_gives_the_training_forward_tokens_and_logits(model):
    """Greedy with the cache = greedy by the training forward over the whole sequence each step
    (tokens exactly, every step's logits within 1e-5); the first pass over the prompt is the
    training forward itself, bit for bit."""
    prompt = PROMPTS[0]
    cached = generate(model, [prompt], GREEDY, eos_id=None)[0]
    assert generate(model, [prompt], GREEDY, eos_id=None, use_cache=False)[0] == cached
    sequence = list(prompt)
    for _ in range(GREEDY.max_new_tokens):
        sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert cached == sequence[len(prompt) :]
    assert len(set(cached)) > 2  # the model does not just repeat itself

    cache = KVCache(model.args.n_layers, torch.zeros(1, dtype=torch.long), len(sequence))
    prefill = model(torch.tensor([prompt]), kv_cache=cache)
    assert torch.equal(prefill, model(torch.tensor([prompt])))
    for t in range(len(prompt), len(sequence)):
        step = model(torch.tensor([[sequence[t]]]), kv_cache=cache)[0, -1]
        whole = model(torch.tensor([sequence[: t + 1]]))[0, -1]
        torch.testing.assert_close(step, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_batch_gives_each_prompt_its_tokens_alone(model, settings):
    """Left-padded together (lengths 6, 2, 9) or one at a time, and in another batch order: the same
    tokens for every prompt (each prompt keeps its index, hence its sampling generator)."""
    batched = generate(model, PROMPTS, settings, eos_id=None)
    alone = [generate(model, [p], settings, eos_id=None, first_index=i)[0] for i, p in enumerate(PROMPTS)]
    assert batched == alone
    pair = generate(model, PROMPTS[1:], settings, eos_id=None, first_index=1)
    assert pair == batched[1:]
    no_cache = generate(model, PROMPTS, settings, eos_id=None, use_cache=False)
    assert no_cache == batched


def test_the_same_seed_gives_the_same_tokens(model):
    first = generate(model, PROMPTS, SAMPLED, eos_id=None)
    assert generate(model, PROMPTS, SAMPLED, eos_id=None) == first
    other_seed = SamplingSettings(**{**SAMPLED.__dict__, "seed": 6})
    assert generate(model, PROMPTS, other_seed, eos_id=None) != first
    assert first != generate(model, PROMPTS, GREEDY, eos_id=None)  # it samples


def test_eos_ends_a_prompt_but_not_its_batch(model):
    greedy = generate(model, PROMPTS, GREEDY, eos_id=None)
    eos = greedy[0][2]  # the third token of the first prompt
    ended = generate(model, PROMPTS, GREEDY, eos_id=eos)
    for full, cut in zip(greedy, ended, strict=True):
        stop = full.index(eos) + 1 if eos in full else len(full)
        assert cut == full[:stop]
    assert len(ended[0]) == 3 and max(map(len, ended)) > 3


def test_decoding_counts_no_tokens_for_the_router_bias():
    model = lively_model("deepseek_v3")
    bias = [moe.expert_bias.clone() for moe in model.moe_modules()]
    generate(model, PROMPTS, SAMPLED, eos_id=None)
    for moe, before in zip(model.moe_modules(), bias, strict=True):
        assert not moe.tokens_per_expert.any()
        assert torch.equal(moe.expert_bias, before)
    model(torch.tensor(PROMPTS[:1]))  # a training forward (grad on) counts: the check above can fail
    assert all(moe.tokens_per_expert.sum() > 0 for moe in model.moe_modules())


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    model = lively_model("llama3")
    greedy = generate(model, PROMPTS, GREEDY, eos_id=None)
    for narrow in (SamplingSettings(max_new_tokens=8, top_k=1, seed=1), SamplingSettings(max_new_tokens=8, top_p=1e-6)):
        assert generate(model, PROMPTS, narrow, eos_id=None) == greedy


@pytest.mark.parametrize(
    "change, fragment",
    [({"top_p": 1.5}, "--top-p"), ({"top_p": 0.0}, "--top-p"), ({"temperature": -1.0}, "--temperature"),
     ({"top_k": -2}, "--top-k"), ({"max_new_tokens": 0}, "--max-new-tokens")],
)  # fmt: skip
def test_bad_settings_are_refused(change, fragment):
    with pytest.raises(LockstepError, match=fragment):
        SamplingSettings(**change).validate()
