"""torch.compile per transformer block (in place, so parameter names do not change)."""

from __future__ import annotations

from torch import nn

from lockstep.config.sections import CompileConfig


def apply_compile(blocks: nn.ModuleDict, compile_config: CompileConfig) -> None:
    if not compile_config.enable or "model" not in compile_config.components:
        return
    for block in blocks.values():
        block.compile(fullgraph=True)
