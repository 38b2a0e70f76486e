"""What every lockstep decoder shares: the pipeline-splittable forward and the attention masks.

A decoder has ``tok_embeddings``, a ``layers`` ModuleDict of blocks called as
``block(h, rope_cos_sin, masks)``, ``norm`` and ``output``; a pipeline stage sets the parts it does not
hold to None. Subclasses build the blocks (usually ``TransformerBlock``s) and the RoPE table
(``_rope_table``). Decoding with a KV cache calls ``block(h, cos_sin, masks, layer_cache)``
(lockstep.models.common.kv_cache), on one device.

Tied embeddings (``args.tie_embeddings``): ``output.weight`` is the parameter ``tok_embeddings.weight``
itself, one tensor under one name (``named_parameters`` and checkpoints hold it as
``tok_embeddings.weight``; ``state_dict`` also lists the alias ``output.weight``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lockstep.models.common import init as init_fns
from lockstep.models.common.attention import BACKENDS
from lockstep.models.common.kv_cache import KVCache, LayerCache
from lockstep.models.common.masks import AttentionMasks, build_attention_masks, document_ids_from_tokens
from lockstep.models.common.moe import MoE


class Decoder(nn.Module):
    def __init__(self, args, attention_backend: str, layers: dict[str, nn.Module]) -> None:
        """`args` needs dim, vocab_size, norm_eps and validate(); `layers` are the blocks by index;
        `attention_backend` is sdpa or flex, model.attention resolved for the device
        (``resolve_attention_backend``): a model does not know its device when it is built."""
        super().__init__()
        args.validate()
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention backend {attention_backend!r}: resolve model.attention first")
        self.args = args
        self.attention_backend = attention_backend
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keeps names stable ("layers.3") when pipeline stages drop blocks.
        self.layers = nn.ModuleDict(layers)
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tied_embeddings = bool(getattr(args, "tie_embeddings", False))
        self.attention_chunk_size: int | None = getattr(args, "attention_chunk_size", None)
        """Chunk of the layers with chunked local attention (Llama 4), or None: all attend over the window."""
        if self.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope_cos_sin", self._rope_table(self.norm.weight.device), persistent=False)

    def _rope_table(self, device: torch.device | str) -> torch.Tensor:
        """The [max_seq_len, rotated dims / 2, 2] RoPE table of this model (lockstep.models.common.rope)."""
        raise NotImplementedError

    depth_scaled: tuple[str, ...] = ()
    """Name suffixes of the output projections whose init std shrinks with depth."""

    def init_for(self, name: str) -> init_fns.InitFn:
        """The initialiser of parameter `name` (torchtitan's scheme: unit-std embeddings, output at
        dim^-0.5, depth-scaled output projections, 0.02 elsewhere; a tied embedding at 0.02)."""
        if name.endswith("norm.weight"):
            return init_fns.ones
        if name == "tok_embeddings.weight":
            # Tied, one matrix is both: at unit std (an embedding's) the logits would be huge, and at the
            # output's dim^-0.5 each token's own embedding would dominate its logits (a copy prior), so
            # 0.02, as in transformers' and torchtitan's Qwen3.
            return init_fns.trunc_normal(0.02) if self.tied_embeddings else init_fns.normal(1.0)
        if name == "output.weight":
            return init_fns.trunc_normal(self.args.dim**-0.5)
        if name.endswith(self.depth_scaled):
            layer_id = int(name.split(".")[1])
            return init_fns.trunc_normal(0.02 / (2 * (layer_id + 1)) ** 0.5)
        return init_fns.trunc_normal(0.02)

    def materialize(self, device: torch.device | str) -> None:
        """Allocate (from meta) on `device` for weights that are loaded next, instead of initialising
        them (``init_weights`` would draw every parameter first): buffers are zeroed and the RoPE
        table, which no checkpoint holds, is built."""
        self.to_empty(device=device)
        self.tie_embeddings_again()
        for buffer in self.buffers():
            buffer.zero_()
        self.rope_cos_sin = self._rope_table(device)

    def tie_embeddings_again(self) -> None:
        """Point ``output.weight`` at ``tok_embeddings.weight`` again (a tied model): ``to_empty`` and
        the tensor-parallel plans replace the two modules' parameters one module at a time."""
        if self.tied_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self, root_seed: int, device: torch.device | str) -> None:
        """Materialise (from meta) on `device`, zero the buffers (MoE router state), build the RoPE
        table and fill every parameter from (root_seed, name)."""
        self.materialize(device)
        self.fill_weights(root_seed)

    def fill_weights(self, root_seed: int) -> None:
        """Every parameter's initial values from (root_seed, name), in place (after ``materialize``)."""
        init_fns.initialize_parameters(self, root_seed, self.init_for)

    def moe_modules(self) -> list[nn.Module]:
        """The mixture-of-experts blocks (lockstep.models.common.moe.MoE), in layer order."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_force_load_balance(self, enabled: bool) -> None:
        """Debug: every router assigns tokens round-robin (see ``Router.force_load_balance``)."""
        for moe in self.moe_modules():
            moe.router.force_load_balance = enabled

    def get_attention_masks(self, tokens_BS: torch.Tensor, eos_id: int, deferred: bool = False) -> AttentionMasks:
        """Block-causal masks for packed documents separated by `eos_id`, for this model's kernel;
        `deferred` returns only the document ids, from which forward builds the mask (pipelining)."""
        document_ids = document_ids_from_tokens(tokens_BS, eos_id)
        if deferred:
            return AttentionMasks(document_ids=document_ids)
        return build_attention_masks(document_ids, self.attention_backend, self.attention_chunk_size)

    def forward(
        self,
        tokens_BS: torch.Tensor,
        attention_masks: AttentionMasks | None = None,
        head: Callable[[torch.Tensor, nn.Linear], torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, vocab] (hidden states on a stage without the output). Without masks attention is
        plain causal over the whole sequence (within chunks on a model's chunked layers). `head(h_BSD, output)`, when given, replaces the output
        projection and its result is returned: a loss that projects a few tokens at a time never holds
        the [B, S, vocab] logits, and running it here keeps it inside FSDP's forward of the root (which
        holds `output`). A pipeline passes it to every stage; only the last (which has `output`) calls
        it, so that stage returns the microbatch loss. Under tensor parallelism the logits may be a
        vocab-sharded DTensor (the plan's loss parallelism).

        `kv_cache` (inference, one device): `tokens_BS` are the tokens after those already cached;
        the cache gives their positions and masks (`attention_masks` must be None) and every layer
        stores their keys and values in it. Without it the training path runs, unchanged."""
        h = self.tok_embeddings(tokens_BS) if self.tok_embeddings is not None else tokens_BS
        if kv_cache is not None:
            if attention_masks is not None:
                raise ValueError("with a KV cache the cache builds the attention masks; pass none")
            positions_BS, masks = kv_cache.begin(tokens_BS.shape[1], self.attention_chunk_size)
            cos_sin = self.rope_cos_sin[positions_BS]  # [B, S, D/2, 2]: each row's own positions
            for name, layer in self.layers.items():
                h = layer(h, cos_sin, masks, kv_cache.layers[int(name)])
            return self.output(self.norm(h))
        if attention_masks is None and self.attention_chunk_size is not None:
            attention_masks = AttentionMasks()
        if attention_masks is not None:
            attention_masks = attention_masks.resolve(
                self.attention_backend, self.attention_chunk_size, tokens_BS.shape[1]
            )
        for layer in self.layers.values():
            h = layer(h, self.rope_cos_sin, attention_masks)
        h = self.norm(h) if self.norm is not None else h
        if self.output is None:
            return h
        return self.output(h) if head is None else head(h, self.output)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attention(attention_norm(x)); out = h + ffn(ffn_norm(h)), where the ffn
    is ``feed_forward`` (a dense SwiGLU) or ``moe`` (lockstep.models.common.moe), whichever is given.
    The attention takes (x, rope_cos_sin, masks, cache)."""

    def __init__(
        self,
        dim: int,
        *,
        norm_eps: float,
        attention: nn.Module,
        feed_forward: nn.Module | None = None,
        moe: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (feed_forward is None) == (moe is None):
            raise ValueError("a block has either a feed_forward or a moe")
        self.attention_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attention = attention
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        if feed_forward is not None:
            self.feed_forward = feed_forward
        else:
            self.moe = moe

    def forward(
        self, x: torch.Tensor, cos_sin: torch.Tensor, masks: AttentionMasks | None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos_sin, masks, cache=cache)  # TP plans see 3 inputs
        ffn = self.feed_forward if hasattr(self, "feed_forward") else self.moe
        return h + ffn(self.ffn_norm(h))
