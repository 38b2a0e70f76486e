"""DeepSeek-V3 architecture: the args dataclass and the flavor table. Architecture only."""

from __future__ import annotations

from dataclasses import dataclass

from lockstep.models.common.rope import YarnRopeScaling


@dataclass(frozen=True)
class DeepSeekV3Args:
    dim: int = 7168
    """Hidden size."""
    n_layers: int = 61
    """Transformer blocks."""
    n_dense_layers: int = 3
    """The first blocks use a dense SwiGLU instead of experts."""
    n_heads: int = 128
    """Attention heads."""
    vocab_size: int = -1
    """Set from the tokenizer at build time."""
    max_seq_len: int = 4096
    """Length of the RoPE table; set to the training sequence length at build time."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    q_lora_rank: int = 1536
    """Rank of the query down-projection; 0 projects queries directly."""
    kv_lora_rank: int = 512
    """Rank of the shared key/value latent."""
    qk_nope_head_dim: int = 128
    """Per-head query/key dims without RoPE."""
    qk_rope_head_dim: int = 64
    """Per-head query/key dims with (decoupled) RoPE; keys share one RoPE part across heads."""
    v_head_dim: int = 128
    """Per-head value dims."""
    rope_theta: float = 10000.0
    """RoPE base (interleaved pairs, as DeepSeek lays them out)."""
    rope_scaling: YarnRopeScaling | None = None
    """YaRN long-context scaling of the RoPE frequencies and of the softmax scale (mscale); None for plain RoPE."""
    inter_dim: int = 18432
    """Hidden size of the dense SwiGLU blocks."""
    moe_inter_dim: int = 2048
    """Hidden size of each expert (and, times n_shared_experts, of the shared expert)."""
    n_routed_experts: int = 256
    """Routed experts per MoE block."""
    n_shared_experts: int = 1
    """Shared experts (always active), fused into one SwiGLU."""
    n_activated_experts: int = 8
    """Experts per token (top-k)."""
    n_expert_groups: int = 8
    """Expert groups for group-limited routing (1 = none)."""
    n_limited_groups: int = 4
    """Groups a token may route to."""
    score_func: str = "sigmoid"
    """Router scores: sigmoid (V3) or softmax (V2)."""
    route_scale: float = 2.5
    """Routing weights are multiplied by this."""
    norm_topk_prob: bool = True
    """Renormalise the chosen weights to sum to 1 (before route_scale)."""
    bias_update_speed: float = 1e-3
    """Auxiliary-loss-free balancing: the per-expert bias moves by this per step (0 = off)."""
    seq_aux_loss_alpha: float = 0.0
    """Weight of the sequence-wise balance loss (0 = off)."""

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def from_dict(cls, values: dict) -> DeepSeekV3Args:
        """Inverse of dataclasses.asdict (as recorded in checkpoint manifests)."""
        scaling = values.get("rope_scaling")
        return cls(**values | {"rope_scaling": YarnRopeScaling(**scaling) if scaling else None})

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(q/k head dim), times YaRN's mscale correction when the RoPE is scaled."""
        scale = self.qk_head_dim**-0.5
        return scale * self.rope_scaling.softmax_scale_factor if self.rope_scaling is not None else scale

    def validate(self) -> None:
        if self.vocab_size <= 0:
            raise ValueError("vocab_size must be set from the tokenizer before building the model")
        if self.n_routed_experts % self.n_expert_groups or self.n_limited_groups > self.n_expert_groups:
            raise ValueError("n_routed_experts must split into n_expert_groups, n_limited_groups <= n_expert_groups")
        if self.score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func must be sigmoid or softmax, not {self.score_func!r}")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers {self.n_dense_layers} exceeds n_layers {self.n_layers}")
        if not 0 < self.n_activated_experts <= self.n_routed_experts:
            raise ValueError("needs 0 < n_activated_experts <= n_routed_experts")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim == 0:
            raise ValueError(f"qk_rope_head_dim {self.qk_rope_head_dim} must be even and > 0 (RoPE rotates pairs)")


DEEPSEEK_V3_FLAVORS: dict[str, DeepSeekV3Args] = {
    # Tiny: 1 dense + 3 MoE blocks, 8 experts in 4 groups (2 usable per token), top-2, 1 shared.
    "debug": DeepSeekV3Args(
        dim=256,
        n_layers=4,
        n_dense_layers=1,
        n_heads=8,
        q_lora_rank=0,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        inter_dim=512,
        moe_inter_dim=128,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=1.0,
    ),  # fmt: skip
    # DeepSeek-V2-Lite shape (torchtitan's "16B"): softmax routing, no groups.
    "16B": DeepSeekV3Args(
        dim=2048,
        n_layers=27,
        n_dense_layers=1,
        n_heads=16,
        q_lora_rank=0,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        inter_dim=10944,
        moe_inter_dim=1408,
        n_routed_experts=64,
        n_shared_experts=2,
        n_activated_experts=6,
        n_expert_groups=1,
        n_limited_groups=1,
        score_func="softmax",
        route_scale=1.0,
        norm_topk_prob=False,
    ),  # fmt: skip
    # DeepSeek-V3's published config: 4K pre-training context, extended 40x to 160K (128K served) by YaRN.
    "671B": DeepSeekV3Args(
        rope_scaling=YarnRopeScaling(
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
    ),  # fmt: skip
}
