"""lockstep.tools.scale.mirror: one process plays one rank of a large world; the mirror group completes
every collective as if each rank held this rank's data."""

import torch
import torch.distributed as dist

from lockstep.tools.scale.mirror import MirrorGroup, mirror_world


def test_the_mirror_group_completes_collectives_as_if_every_rank_held_this_ranks_data():
    with mirror_world(rank=3, world_size=8):
        assert isinstance(dist.group.WORLD, MirrorGroup) and dist.get_rank() == 3
        gathered = torch.empty(8 * 2)
        dist.all_gather_into_tensor(gathered, torch.tensor([1.0, 2.0]))
        assert gathered.tolist() == [1.0, 2.0] * 8
        chunk = torch.empty(2)
        dist.reduce_scatter_tensor(chunk, torch.arange(16.0))
        assert chunk.tolist() == [6.0 * 8, 7.0 * 8]  # rank 3's chunk, summed over 8 equal ranks
        count = torch.tensor([5])
        dist.all_reduce(count)
        assert count.item() == 40
        objects = [None] * 8
        dist.all_gather_object(objects, {"seed": 7})
        assert objects == [{"seed": 7}] * 8
    assert not dist.is_initialized()
