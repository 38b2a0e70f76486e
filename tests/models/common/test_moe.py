"""The MoE router (group limits, a bias that steers the choice but not the weights) and grouped experts
against the per-expert loop."""

import torch

from lockstep.models.common.moe import GroupedExperts, Router


def _router(**overrides) -> Router:
    settings = dict(dim=16, num_experts=8, top_k=2, score_func="sigmoid", num_groups=4, num_limited_groups=2,
                    route_scale=1.0, norm_topk_prob=True) | overrides  # fmt: skip
    torch.manual_seed(0)
    return Router(**settings)


def test_router_top_k_respects_group_limits():
    router = _router()
    indices, weights = router(torch.randn(500, 16), None)
    assert indices.shape == weights.shape == (500, 2)
    assert (indices[:, 0] != indices[:, 1]).all()  # k distinct experts
    groups_used = (indices // 2).sort(dim=1).values  # 4 groups of 2 experts
    assert ((groups_used[:, 1] - groups_used[:, 0]) >= 0).all()
    assert all(len(set(row.tolist())) <= 2 for row in groups_used)  # at most num_limited_groups groups
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(500))  # renormalised sigmoid weights


def test_bias_steers_the_choice_but_not_the_weights():
    router = _router(num_groups=1, num_limited_groups=1)
    x = torch.randn(100, 16)
    bias = torch.zeros(8)
    bias[5] = 100.0
    indices, weights = router(x, bias)
    assert (indices == 5).any(dim=1).all()  # every token now takes expert 5
    scores = torch.sigmoid(router.gate(x))
    chosen = scores.gather(1, indices)
    torch.testing.assert_close(weights, chosen / chosen.sum(dim=1, keepdim=True))  # weights ignore the bias


def test_grouped_mm_equals_the_per_expert_loop_bitwise():
    torch.manual_seed(1)
    experts = GroupedExperts(16, 32, 4)
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w, std=0.1)
    x = torch.randn(20, 16)
    counts = torch.tensor([5, 0, 9, 6])
    results = []
    for grouped in (True, False):
        experts.use_grouped_mm = grouped
        experts.zero_grad()
        inputs = x.clone().requires_grad_()
        out = experts(inputs, counts)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append([out.detach(), inputs.grad, experts.w1.grad.clone(), experts.w2.grad.clone()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
