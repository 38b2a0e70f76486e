"""Llama 3 architecture: the args dataclass and the flavor table. Architecture only, no run settings."""

from __future__ import annotations

from dataclasses import dataclass

from lockstep.models.common.rope import Llama3RopeScaling


@dataclass(frozen=True)
class Llama3Args:
    dim: int = 4096
    """Hidden size."""
    n_layers: int = 32
    """Transformer blocks."""
    n_heads: int = 32
    """Query heads."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means n_heads."""
    vocab_size: int = -1
    """Set from the tokenizer at build time; -1 until then."""
    multiple_of: int = 256
    """SwiGLU hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Scales the SwiGLU hidden size (2/3 x 4 x dim) before rounding."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 500000.0
    """RoPE base."""
    rope_scaling: Llama3RopeScaling | None = None
    """Llama 3.1-style frequency scaling; None for plain RoPE."""
    max_seq_len: int = 8192
    """Length of the RoPE table; set to the training sequence length at build time."""
    ffn_hidden_size: int | None = None
    """Explicit SwiGLU hidden size (as Hugging Face configs give it); None derives it from dim."""
    tie_embeddings: bool = False
    """The output projection is the embedding matrix (Llama 3.2 1B and 3B tie them)."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, values: dict) -> Llama3Args:
        """Inverse of dataclasses.asdict (as recorded in checkpoint manifests)."""
        scaling = values.get("rope_scaling")
        return cls(**values | {"rope_scaling": Llama3RopeScaling(**scaling) if scaling else None})

    def validate(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.kv_heads:
            raise ValueError(f"dim {self.dim} / n_heads {self.n_heads} / n_kv_heads {self.kv_heads} do not divide")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / n_heads = {self.head_dim} must be even (RoPE rotates pairs)")
        if self.vocab_size <= 0:
            raise ValueError("vocab_size must be set from the tokenizer before building the model")


_LLAMA31_SCALING = Llama3RopeScaling(factor=8.0)
_LLAMA32_SCALING = Llama3RopeScaling(factor=32.0)

LLAMA3_FLAVORS: dict[str, Llama3Args] = {
    # torchtitan's llama3 debug model shape, so throughput compares like for like.
    "debug": Llama3Args(dim=256, n_layers=6, n_heads=16, rope_theta=500000),
    # A smaller one for multi-rank tests on 2 cores.
    "tiny": Llama3Args(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, rope_theta=10000),
    "1B": Llama3Args(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim_multiplier=1.5,
        rope_scaling=_LLAMA32_SCALING,
        tie_embeddings=True,
    ),
    "3B": Llama3Args(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        ffn_dim_multiplier=1.0,
        rope_scaling=_LLAMA32_SCALING,
        tie_embeddings=True,
    ),
    "8B": Llama3Args(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
        rope_scaling=_LLAMA31_SCALING,
    ),
    "70B": Llama3Args(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
        rope_scaling=_LLAMA31_SCALING,
    ),
    "405B": Llama3Args(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        ffn_dim_multiplier=1.2,
        multiple_of=4096,
        rope_scaling=_LLAMA31_SCALING,
    ),
}
