"""The MoE balance step without a model: blocks found in layer order, each block's bias moved with its
own counts, and the statistics named per layer and statistic."""

import torch
from torch import nn

from lockstep.models.common.moe import MoE
from lockstep.train.observe.moe_balance import MoEStats, moe_blocks, move_expert_biases, pool_over_stages


class FakeMoE:
    """What move_expert_biases reads of an MoE block: its token counts and its bias update."""

    def __init__(self, counts: list[float]) -> None:
        self.tokens_per_expert = torch.tensor(counts)
        self.updates = []

    def update_expert_bias(self, counts: torch.Tensor, speed: float) -> torch.Tensor:
        self.updates.append((counts.clone(), speed))
        return torch.full((len(MoE.LOAD_STATS),), float(counts.sum()))


def test_moe_blocks_are_the_layers_with_an_moe_in_each_parts_layer_order():
    def part(names_with_moe: dict[str, bool]) -> nn.Module:
        module = nn.Module()
        layers = {name: nn.Module() for name in names_with_moe}
        for name, has in names_with_moe.items():
            if has:
                layers[name].moe = nn.Identity()
        module.layers = nn.ModuleDict(layers)
        return module

    parts = [part({"0": False, "1": True}), part({"2": True, "3": True})]  # two pipeline stages
    assert [name for name, _ in moe_blocks(parts)] == ["layers.1", "layers.2", "layers.3"]
    assert moe_blocks(parts)[0][1] is parts[0].layers["1"].moe


def test_each_block_moves_its_bias_with_its_own_counts_and_the_stats_keep_the_block_order():
    first, second = FakeMoE([1.0, 2.0]), FakeMoE([5.0, 7.0])
    stats = move_expert_biases([("layers.0", first), ("layers.3", second)], 1e-3, None)
    assert torch.equal(first.updates[0][0], torch.tensor([1.0, 2.0])) and first.updates[0][1] == 1e-3
    assert torch.equal(second.updates[0][0], torch.tensor([5.0, 7.0]))
    assert stats.layers == ["layers.0", "layers.3"] and stats.values[:, 0].tolist() == [3.0, 12.0]


def test_no_blocks_give_empty_statistics():
    stats = move_expert_biases([], 1e-3, None)
    assert stats.layers == [] and stats.values.shape == (0, len(MoE.LOAD_STATS)) and stats.as_floats() == {}


def test_statistics_are_named_by_layer_and_statistic_in_order():
    values = torch.arange(2 * len(MoE.LOAD_STATS), dtype=torch.float32).reshape(2, -1)
    floats = MoEStats(["layers.0", "layers.5"], values).as_floats()
    expected = [f"moe/{layer}/{stat}" for layer in ("layers.0", "layers.5") for stat in MoE.LOAD_STATS]
    assert list(floats) == expected and list(floats.values()) == values.reshape(-1).tolist()


def test_without_a_stage_group_the_statistics_are_this_ranks():
    stats = {"moe/layers.0/load_cv": 0.5}
    assert pool_over_stages(stats, None) is stats
