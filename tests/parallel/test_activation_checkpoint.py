"""lockstep.parallel.activation_checkpoint: full AC recomputes every block in backward, selective "N" every
N-th block (0, N, 2N ...), mode none touches nothing; the blocks keep their class and their parameters
their names (the forward is replaced on the instance); outputs and gradients are bitwise those without
AC; the selective-by-op policy saves matmuls, attention and the chunked linears' operator and recomputes
the rest. These matter because AC is a memory setting that must not change the numbers or the names that
seeded initial values, sharding plans and checkpoints use, and because the every-N-th choice decides
which blocks pay the recomputation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy

from lockstep.config.sections import ActivationCheckpointConfig
from lockstep.parallel.activation_checkpoint import _save_matmuls_policy, apply_activation_checkpointing
from lockstep.parallel.canonical_linear import tree_of_products


class _Block(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + self.down(torch.tanh(self.up(x)))


def _blocks() -> nn.ModuleDict:
    return nn.ModuleDict({str(i): _Block(seed=i) for i in range(5)})


def _run(blocks: nn.ModuleDict) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(9))
    for block in blocks.values():
        x = block(x)
    forward_calls = [block.calls for block in blocks.values()]
    (x**2).sum().backward()
    recomputed = [block.calls - before for block, before in zip(blocks.values(), forward_calls, strict=True)]
    return x.detach(), {name: p.grad for name, p in blocks.named_parameters()}, recomputed


@pytest.mark.parametrize(
    "mode,option,recomputed",
    [("none", "op", [0] * 5), ("full", "op", [1] * 5), ("selective", "2", [1, 0, 1, 0, 1]),
     ("selective", "3", [1, 0, 0, 1, 0]), ("selective", "1", [1] * 5), ("selective", "op", [1] * 5)],
)  # fmt: skip
def test_the_chosen_blocks_recompute_and_the_numbers_and_names_stay(mode, option, recomputed):
    out, grads, none_recomputed = _run(_blocks())
    assert none_recomputed == [0] * 5
    blocks = _blocks()
    names = [name for name, _ in blocks.named_parameters()]
    apply_activation_checkpointing(blocks, ActivationCheckpointConfig(mode=mode, selective_ac_option=option))
    assert all(type(block) is _Block for block in blocks.values())
    assert [name for name, _ in blocks.named_parameters()] == names
    assert [("forward" in vars(block)) for block in blocks.values()] == [bool(r) for r in recomputed]
    checkpointed_out, checkpointed_grads, actually = _run(blocks)
    assert actually == recomputed
    assert torch.equal(checkpointed_out, out)
    assert all(torch.equal(checkpointed_grads[name], grads[name]) for name in names)


def test_the_selective_policy_saves_matmuls_attention_and_the_chunked_linears():
    aten = torch.ops.aten
    saved = [aten.mm.default, aten.addmm.default, aten.bmm.default, tree_of_products._opoverload,
             aten._scaled_dot_product_flash_attention_for_cpu.default, torch._higher_order_ops.flex_attention]  # fmt: skip
    for op in saved:
        assert _save_matmuls_policy(None, op) == CheckpointPolicy.MUST_SAVE, op
    for op in (aten.tanh.default, aten.add.Tensor, aten.mul.Tensor, aten._softmax.default, aten.mm.out):
        assert _save_matmuls_policy(None, op) == CheckpointPolicy.PREFER_RECOMPUTE, op


def _addmm_calls_in_backward(mode: str) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func is torch.ops.aten.addmm.default
            return func(*args, **(kwargs or {}))

    blocks = _blocks()
    apply_activation_checkpointing(blocks, ActivationCheckpointConfig(mode=mode, selective_ac_option="op"))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(9))
    for block in blocks.values():
        x = block(x)
    with Count():
        (x**2).sum().backward()
    return Count.calls


def test_selective_by_op_keeps_the_matmuls_full_recomputes_them():
    """Backward computes no addmm itself (mm for the gradients); full AC reruns `up` in each of the 5 blocks
    (torch stops recomputing early: `down`'s output, which backward does not need, is not recomputed)."""
    assert _addmm_calls_in_backward("none") == 0
    assert _addmm_calls_in_backward("full") == 5
    assert _addmm_calls_in_backward("selective") == 0
