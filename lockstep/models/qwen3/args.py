"""Qwen3 architecture, dense and mixture-of-experts: the args dataclass and the flavor tables.
Architecture only, no run settings.

The real flavors are the shapes of the published Hugging Face checkpoints (config.json of
Qwen/Qwen3-0.6B ... Qwen/Qwen3-32B, Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B); they keep their
151936-row vocabulary (the tokenizer's 151669 tokens, padded), so their weights load as published.
The debug flavors take the vocabulary from the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Qwen3Args:
    dim: int = 4096
    """Hidden size."""
    n_layers: int = 36
    """Transformer blocks."""
    n_heads: int = 32
    """Query heads."""
    n_kv_heads: int | None = 8
    """Key/value heads (grouped-query attention); None means n_heads."""
    head_dim: int = 128
    """Per-head dims, explicit (Qwen3's n_heads x head_dim need not equal dim)."""
    vocab_size: int = -1
    """-1: set from the tokenizer at build time; a real flavor fixes it (padded past the tokenizer)."""
    ffn_hidden_dim: int = 12288
    """Hidden size of the dense SwiGLU blocks (unused when every block is a mixture of experts)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (the block norms and the QK-norm)."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    max_seq_len: int = 40960
    """Length of the RoPE table; set to the training sequence length at build time."""
    tie_embeddings: bool = False
    """The output projection is the embedding matrix (the 0.6B, 1.7B and 4B checkpoints tie them)."""
    n_routed_experts: int = 0
    """Experts per MoE block; 0 is the dense model (every block a SwiGLU)."""
    n_activated_experts: int = 0
    """Experts per token (top-k)."""
    moe_inter_dim: int = 0
    """Hidden size of each expert."""
    norm_topk_prob: bool = True
    """Renormalise the top-k softmax weights to sum to 1 (true in every published Qwen3-MoE)."""
    bias_update_speed: float = 0.0
    """Auxiliary-loss-free balancing: the per-expert routing bias moves by this per step (0 = off).
    Off by default: transformers' Qwen3-MoE has no routing bias, so a moved bias could not be exported."""
    seq_aux_loss_alpha: float = 0.0
    """Weight of the sequence-wise balance loss (lockstep.models.common.moe; DeepSeek-V3's form, not
    transformers' global-batch ``load_balancing_loss_func``); 0 = off."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @classmethod
    def from_dict(cls, values: dict) -> Qwen3Args:
        """Inverse of dataclasses.asdict (as recorded in checkpoint manifests)."""
        return cls(**values)

    def validate(self) -> None:
        if self.bias_update_speed:
            raise ValueError(
                "bias_update_speed must be 0 for Qwen3: its routers have no bias in transformers, so a moved bias "
                "could never be exported (use the auxiliary loss, seq_aux_loss_alpha, to balance the experts)"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads {self.kv_heads} does not divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.vocab_size <= 0:
            raise ValueError("vocab_size must be set from the tokenizer before building the model")
        if self.is_moe and not (0 < self.n_activated_experts <= self.n_routed_experts and self.moe_inter_dim > 0):
            raise ValueError("an MoE flavor needs 0 < n_activated_experts <= n_routed_experts and moe_inter_dim > 0")


QWEN3_VOCAB = 151936
"""Rows of the published checkpoints' embedding (and untied output) matrices."""

QWEN3_FLAVORS: dict[str, Qwen3Args] = {
    # Tiny, with what makes Qwen3 Qwen3: QK-norm, GQA, head_dim * n_heads != dim, tied embeddings.
    "debug": Qwen3Args(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64, ffn_hidden_dim=768, tie_embeddings=True
    ),
    "0.6B": Qwen3Args(
        dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_hidden_dim=3072, vocab_size=QWEN3_VOCAB,
        tie_embeddings=True,
    ),
    "1.7B": Qwen3Args(
        dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, ffn_hidden_dim=6144, vocab_size=QWEN3_VOCAB,
        tie_embeddings=True,
    ),
    "4B": Qwen3Args(
        dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, ffn_hidden_dim=9728, vocab_size=QWEN3_VOCAB,
        tie_embeddings=True,
    ),
    "8B": Qwen3Args(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_hidden_dim=12288, vocab_size=QWEN3_VOCAB),
    "14B": Qwen3Args(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, ffn_hidden_dim=17408, vocab_size=QWEN3_VOCAB),
    "32B": Qwen3Args(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, ffn_hidden_dim=25600, vocab_size=QWEN3_VOCAB),
}  # fmt: skip
"""Dense Qwen3. head_dim 128, RoPE theta 1e6 and RMSNorm eps 1e-6 throughout (the class defaults)."""

QWEN3_MOE_FLAVORS: dict[str, Qwen3Args] = {
    # Tiny: 8 experts, top-2, every block a mixture of experts (as in the published models), untied.
    "debug": Qwen3Args(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64, ffn_hidden_dim=768,
        n_routed_experts=8, n_activated_experts=2, moe_inter_dim=128, seq_aux_loss_alpha=0.001,
    ),
    "30B-A3B": Qwen3Args(
        dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, ffn_hidden_dim=6144, vocab_size=QWEN3_VOCAB,
        n_routed_experts=128, n_activated_experts=8, moe_inter_dim=768, seq_aux_loss_alpha=0.001,
    ),
    "235B-A22B": Qwen3Args(
        dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, ffn_hidden_dim=12288, vocab_size=QWEN3_VOCAB,
        n_routed_experts=128, n_activated_experts=8, moe_inter_dim=1536, seq_aux_loss_alpha=0.001,
    ),
}  # fmt: skip
"""Qwen3-MoE: every block routes each token to 8 of 128 experts (softmax router, renormalised top-k
weights, no shared expert). Balanced by the sequence-wise auxiliary loss at 0.001, the weight of
Qwen3-MoE's own router_aux_loss_coef (whose loss is global-batch; see ``seq_aux_loss_alpha``)."""
