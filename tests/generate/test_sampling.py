"""lockstep.generate.sampling on hand-made logits, no model: a sampled token is the inverse CDF of
exactly one uniform draw per step from the prompt's own CPU generator (seeded from the seed and the
prompt's index), so a prompt's tokens do not depend on the other prompts of its batch; top-k and top-p
restrict the support to the k most likely tokens and to the nucleus whose more likely mass is below
top_p, never sampling a token outside it; greedy takes the argmax and draws nothing. This matters
because `lockstep generate` promises the same tokens for the same seed whatever the batching, and a
sampler that drew one number too many, or let a cut token through, would break that silently."""

from __future__ import annotations

import math

import torch

from lockstep.generate.sampling import SamplingSettings, next_tokens, prompt_generator

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _expected_token(logits: torch.Tensor, temperature: float, u: float) -> int:
    """The inverse CDF of `u` under softmax(logits / temperature), computed in plain Python."""
    scaled = [float(x) / temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(s - top) for s in scaled]
    total = sum(weights)
    cumulative = 0.0
    for index, weight in enumerate(weights):
        cumulative += weight / total
        if cumulative > u:
            return index
    return len(weights) - 1


def test_each_step_is_the_inverse_cdf_of_one_uniform_draw():
    settings = SamplingSettings(temperature=1.7, seed=11)
    generator = prompt_generator(11, 3)
    replay = prompt_generator(11, 3)
    for _ in range(40):
        (token,) = next_tokens(LOGITS[None], settings, [generator])
        u = float(torch.rand((), dtype=torch.float64, generator=replay))
        assert token == _expected_token(LOGITS, 1.7, u)
    # both generators drew the same count of numbers: one per step
    assert torch.equal(generator.get_state(), replay.get_state())


def test_a_prompts_tokens_do_not_depend_on_its_batch():
    settings = SamplingSettings(temperature=1.0, top_k=4, top_p=0.9, seed=5)
    other = torch.randn(6, generator=torch.Generator().manual_seed(0))
    alone, batched = [], []
    gen_alone = prompt_generator(5, 1)
    gens_batch = [prompt_generator(5, 0), prompt_generator(5, 1)]
    for _ in range(30):
        alone += next_tokens(LOGITS[None], settings, [gen_alone])
        batched.append(next_tokens(torch.stack([other, LOGITS]), settings, gens_batch)[1])
    assert alone == batched
    assert len(set(alone)) > 1  # it does sample


def test_seed_and_index_each_change_the_stream_and_repeat_exactly():
    def draws(seed, index):
        g = prompt_generator(seed, index)
        return [float(torch.rand((), dtype=torch.float64, generator=g)) for _ in range(4)]

    assert draws(3, 0) == draws(3, 0)
    assert len({tuple(draws(s, i)) for s, i in [(3, 0), (3, 1), (4, 0), (4, 1)]}) == 4


def test_top_k_support_is_the_k_most_likely_tokens():
    settings = SamplingSettings(temperature=1.0, top_k=3, seed=0)
    seen = set()
    for index in range(300):
        seen |= set(next_tokens(LOGITS[None], settings, [prompt_generator(0, index)]))
    assert seen == set(LOGITS.argsort(descending=True)[:3].tolist())


def test_top_p_support_is_the_nucleus_and_the_first_token_always_stays():
    probs = LOGITS.double().softmax(-1)
    sorted_probs = probs.sort(descending=True).values.tolist()
    # the nucleus: tokens whose more likely mass is below top_p; take top_p midway between two prefix sums
    prefix = [sum(sorted_probs[:i]) for i in range(len(sorted_probs) + 1)]
    top_p = (prefix[2] + prefix[3]) / 2  # the nucleus is the 3 most likely tokens
    settings = SamplingSettings(temperature=1.0, top_p=top_p, seed=0)
    seen = set()
    for index in range(300):
        seen |= set(next_tokens(LOGITS[None], settings, [prompt_generator(0, index)]))
    assert seen == set(LOGITS.argsort(descending=True)[:3].tolist())

    tiny = SamplingSettings(temperature=1.0, top_p=1e-9, seed=0)
    tokens = {next_tokens(LOGITS[None], tiny, [prompt_generator(0, i)])[0] for i in range(50)}
    assert tokens == {int(LOGITS.argmax())}


def test_greedy_takes_the_argmax_and_draws_nothing():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    for settings in (SamplingSettings(greedy=True, temperature=5.0, top_k=2), SamplingSettings(temperature=0.0)):
        assert settings.is_greedy
        gens = [prompt_generator(1, 0), prompt_generator(1, 1)]
        states = [g.get_state() for g in gens]
        assert next_tokens(logits, settings, gens) == [0, len(LOGITS) - 1]
        assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states, strict=True))
