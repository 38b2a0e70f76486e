"""torch.compile per transformer block, the way FSDP2 expects it.

Each block's bound ``forward`` is compiled and put back on the instance, before ``fully_shard``:

- FSDP2's pre/post-forward hooks (all-gather, reshard, backward hooks) run in ``Module.__call__``,
  around ``forward``, so they stay outside the compiled region. ``nn.Module.compile`` would compile
  ``_call_impl`` instead and trace the hooks that ``fully_shard`` registers later.
- No wrapper module (``torch.compile(block)`` returns an ``OptimizedModule``), so parameter names keep
  no ``_orig_mod.`` prefix: seeded initial values, sharding plans, checkpoints and fingerprints are
  all keyed by name.
- Dynamo caches graphs on the code object and guards on the module's type, not its identity, so
  every block of one shape reuses a single graph. A model with more blocks than the recompile limit
  must not quietly run eager past it, so hitting the limit raises instead.

Activation checkpointing runs before this and also replaces ``forward``; compiling that wrapper
traces ``torch.utils.checkpoint`` as one higher-order op, as torchtitan does.

A mixture-of-experts block cannot be one full graph: its dispatch reads per-expert counts on the host
(fp32 experts loop over ``counts.tolist()``; expert parallelism sizes its all-to-all from them) and
asks autograd whether it runs inside a recompute. Such a block is compiled piecewise instead: every
child but the MoE, plus the MoE's router and shared experts, each in full graph; the dispatch and the
routed experts stay eager.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from lockstep.config.sections import CompileConfig
from lockstep.models.common.moe import MoE


def _compile_forward(module: nn.Module) -> None:
    module.forward = torch.compile(module.forward, fullgraph=True)


def _moe_of(block: nn.Module) -> MoE | None:
    return next((child for child in block.children() if isinstance(child, MoE)), None)


def apply_compile(blocks: nn.ModuleDict, compile_config: CompileConfig) -> None:
    """Compile each block's forward in place (after tensor parallel, EP and AC; before FSDP)."""
    if not compile_config.enable or "model" not in compile_config.components:
        return
    # Past the limit dynamo would run the frame eagerly with only a warning: fail closed instead.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    for block in blocks.values():
        moe = _moe_of(block)
        if moe is None:
            _compile_forward(block)
            continue
        pieces = [child for child in block.children() if child is not moe]
        pieces += [m for m in (moe.router, moe.shared_experts) if m is not None]
        for piece in pieces:
            _compile_forward(piece)
