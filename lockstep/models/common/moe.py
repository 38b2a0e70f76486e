"""Mixture of experts, single-device code: a top-k router (sigmoid or softmax scores, optional
group-limited routing, optionally renormalised top-k weights, auxiliary-loss-free bias), routed
experts stored as grouped weights, optional shared experts, an optional sequence-wise auxiliary
balance loss, and a dispatch/combine whose forward is order-fixed (a stable sort, gathers, and a per-token
sum of the k expert outputs in slot order). Its backward is not atomic-free: the dispatch gather's
gradient (index_put with accumulate) adds each token's k slot gradients, which PyTorch documents as
nondeterministic on CPU and which compiled (Inductor) CUDA kernels add with atomics;
``torch.use_deterministic_algorithms``, set by ``debug.deterministic``, selects order-fixed kernels.
The forward makes no host sync unless the per-expert loop runs (one ``tolist`` of the counts).

Expert parallelism is applied from outside (``lockstep.parallel.expert_parallel``) by replacing
``GroupedExperts.compute`` with an all-to-all version; nothing here knows about ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lockstep.models.common.feed_forward import FeedForward

_counting = [True]


@contextlib.contextmanager
def token_counting_paused():
    """Forwards run inside do not count routed tokens (e.g. a pipeline stage's metadata inference,
    which runs the stage once on sample data before the first real step)."""
    previous, _counting[0] = _counting[0], False
    try:
        yield
    finally:
        _counting[0] = previous


class Router(nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        num_experts: int,
        top_k: int,
        score_func: str,
        num_groups: int,
        num_limited_groups: int,
        route_scale: float,
        norm_topk_prob: bool,
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts, self.top_k, self.score_func = num_experts, top_k, score_func
        self.num_groups, self.num_limited_groups = num_groups, num_limited_groups
        self.route_scale, self.norm_topk_prob = route_scale, norm_topk_prob
        self.force_load_balance = False
        """Debug: assign tokens round-robin so every expert gets the same count (weights still learned)."""

    def forward(self, x_ND: torch.Tensor, expert_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert indices [N, k], routing weights [N, k] fp32). The bias only steers the choice."""
        logits = F.linear(x_ND.float(), self.gate.weight.float())
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        if self.force_load_balance:
            positions = torch.arange(x_ND.shape[0] * self.top_k, device=x_ND.device)
            indices = (positions % self.num_experts).view(-1, self.top_k)
        else:
            indices = self._choose(scores if expert_bias is None else scores + expert_bias)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:  # the chosen weights sum to 1 (DeepSeek-V3's sigmoid, Qwen3-MoE's softmax)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * self.route_scale

    def _choose(self, scores_NE: torch.Tensor) -> torch.Tensor:
        if self.num_groups > 1:  # keep the best num_limited_groups groups (by their top-2 scores)
            grouped = scores_NE.view(-1, self.num_groups, self.num_experts // self.num_groups)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.num_limited_groups, dim=-1)[1], True)
            scores_NE = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(scores_NE)
        return scores_NE.topk(self.top_k, dim=-1)[1]


class GroupedExperts(nn.Module):
    """E SwiGLU experts as three [E, out, in] weights. Tokens arrive sorted by expert."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.use_grouped_mm = True

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [T, dim] grouped by expert, counts [E] tokens per expert -> [T, dim]."""
        return self.compute(x_sorted, counts, self.w1, self.w2, self.w3)

    def compute(self, x, counts, w1, w2, w3) -> torch.Tensor:
        # torch 2.13: eager _grouped_mm takes fp32 and (aligned) bf16; compiled, only bf16.
        fp32_ok = x.dtype == torch.float32 and not torch.compiler.is_compiling()
        grouped_ok = fp32_ok or (x.dtype == torch.bfloat16 and _aligned(w1, w2, w3))
        if self.use_grouped_mm and grouped_ok:
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            mm = lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1), offs=offsets)  # noqa: E731
            return mm(F.silu(mm(x, w1)) * mm(x, w3), w2)
        pieces = []
        for e, chunk in enumerate(x.split(counts.tolist())):
            pieces.append(F.linear(F.silu(F.linear(chunk, w1[e])) * F.linear(chunk, w3[e]), w2[e]))
        return torch.cat(pieces) if pieces else x


def _aligned(*weights: torch.Tensor) -> bool:
    return all(w.shape[-1] * w.element_size() % 16 == 0 and w.shape[-2] * w.element_size() % 16 == 0 for w in weights)


class MoE(nn.Module):
    """Routed experts plus shared experts. ``expert_bias`` (persistent, checkpointed) is the
    auxiliary-loss-free balancing bias; ``tokens_per_expert`` counts this step's routing and is
    consumed by ``update_expert_bias`` after the optimizer step.

    `score_before_experts` (Llama 4): each token enters its experts already multiplied by its routing
    weight, and their outputs are summed unweighted; otherwise (DeepSeek-V3, Qwen3-MoE) the outputs
    are weighted. The two differ: an expert is not linear in its input."""

    def __init__(
        self,
        dim: int,
        *,
        hidden_dim: int,
        num_experts: int,
        num_shared: int,
        router: Router,
        score_before_experts: bool = False,
    ) -> None:
        super().__init__()
        self.router = router
        self.score_before_experts = score_before_experts
        self.experts = GroupedExperts(dim, hidden_dim, num_experts)
        self.shared_experts = FeedForward(dim, hidden_dim * num_shared) if num_shared else None
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts), persistent=False)
        self.seq_aux_loss_alpha = 0.0

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x_BSD.shape
        flat = x_BSD.reshape(-1, dim)
        indices, weights = self.router(flat, self.expert_bias)
        top_k = indices.shape[1]
        # Count training forwards only: not activation-checkpoint recomputes (run inside backward),
        # nor no-grad passes, nor passes under token_counting_paused().
        count = _counting[0] and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1
        with torch.no_grad():
            expert_of_slot = indices.reshape(-1)
            order = torch.argsort(expert_of_slot, stable=True)  # slots grouped by expert, token order kept
            # Counts by binary search over the sorted experts (bincount has no deterministic CUDA kernel).
            edges = torch.arange(self.experts.w1.shape[0] + 1, device=flat.device)
            counts = torch.diff(torch.searchsorted(expert_of_slot[order], edges))
            if count:
                self.tokens_per_expert += counts
            inverse = torch.argsort(order)
        routed_in = flat[order // top_k]
        if self.score_before_experts:
            routed_in = routed_in * weights.reshape(-1)[order].unsqueeze(-1).to(routed_in.dtype)
        routed = self.experts(routed_in, counts)[inverse].view(-1, top_k, dim)
        if not self.score_before_experts:
            routed = routed * weights.unsqueeze(-1).to(routed.dtype)
        # Combine without atomics (forward): each token sums its k expert outputs in slot order.
        out = routed.sum(dim=1).view(batch, seq_len, dim)
        if self.seq_aux_loss_alpha > 0 and self.training:
            out = AddAuxiliaryLoss.apply(out, self._sequence_aux_loss(flat, indices, batch))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_BSD)
        return out

    def _sequence_aux_loss(self, flat: torch.Tensor, indices: torch.Tensor, batch: int) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise balance loss: alpha * sum_e f_e * P_e per sequence, averaged."""
        num_experts, top_k = self.experts.w1.shape[0], indices.shape[1]
        logits = F.linear(flat.float(), self.router.gate.weight.float())
        scores = logits.sigmoid() if self.router.score_func == "sigmoid" else logits.softmax(-1)
        scores = (scores / scores.sum(-1, keepdim=True)).view(batch, -1, num_experts)
        chosen = F.one_hot(indices, num_experts).sum(1).view(batch, -1, num_experts).float()
        f = chosen.mean(1) * num_experts / top_k
        return self.seq_aux_loss_alpha * (f * scores.mean(1)).sum(-1).mean()

    LOAD_STATS = ("load_min", "load_max", "load_cv", "bias_absmax")
    """Names of the values ``update_expert_bias`` returns, in order."""

    @torch.no_grad()
    def update_expert_bias(self, global_counts: torch.Tensor, speed: float) -> torch.Tensor:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones (by `speed`), from
        the step's token counts over all ranks; returns the load statistics (``LOAD_STATS``) as one
        fp32 tensor on the device, so that nothing here waits for the device."""
        mean = global_counts.mean()
        if speed > 0:
            self.expert_bias += speed * torch.sign(mean - global_counts)
        self.tokens_per_expert.zero_()
        cv = global_counts.std(unbiased=False) / mean.clamp_min(1e-9)
        return torch.stack([global_counts.min(), global_counts.max(), cv, self.expert_bias.abs().max()]).float()


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on `x` whose backward also sends gradient 1 into `aux_loss`, so an auxiliary loss
    trains the router without changing what forward returns."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.dtype, ctx.device = aux_loss.dtype, aux_loss.device
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=ctx.dtype, device=ctx.device)
