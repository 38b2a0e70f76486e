"""lockstep.tools.estimate.wire, driven through the real ``torch.distributed`` calls in a fake process
group (one process as rank 1 or 5 of 8, 4 ranks per node, no communication): each collective is counted
with its NCCL algorithm's bytes (a ring's (n-1) chunks, an all-reduce twice that, an all-to-all's chunks
per peer, a send to its peer), split between links by where the ring crosses nodes or where each chunk
goes, over the ranks of the group actually passed; lockstep's canonical all-reduce is counted as its own
kind and moves a ring all-reduce's bytes; its two-level form sends between nodes what a hierarchical ring
sends, S/G x (N-1)/N twice; and counting stops with the block. This matters because ``lockstep estimate``
reports these numbers as the job's network traffic and holds the canonical reductions to the
hierarchical floor: a wrong binder or split would misstate the inter-node bytes that decide whether a
layout is network-bound. test_rank_step.py checks the trainer against the estimate; these check each
wrapped call, and the ring model's arithmetic (the last test). Every expected value is derived here from
the algorithm, not read off the counter."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from lockstep.config.job import ParallelDims
from lockstep.parallel.canonical import tree_all_reduce
from lockstep.parallel.mesh import build_mesh
from lockstep.parallel.node_levels import axis_levels
from lockstep.tools.estimate.trace import fake_world
from lockstep.tools.estimate.wire import WireCounter

WORLD, PER_NODE = 8, 4
F32 = 4  # bytes
RING_CROSSINGS = 2  # ranks 0-7 in a ring over 2 nodes of 4: hops 3->4 and 7->0 leave the node


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # all_gather_into_tensor's deprecation in newer torch
        yield


def _ring_split(sent: float, crossings: int = RING_CROSSINGS, n: int = WORLD) -> dict[str, int]:
    inter = sent * crossings / n
    return {"intra": round(sent - inter), "inter": round(inter)}


def test_each_collective_is_counted_with_its_algorithms_bytes_per_link():
    with fake_world(1, WORLD):
        counter = WireCounter(rank=1, ranks_per_node=PER_NODE)
        with counter:
            dist.all_reduce(torch.zeros(64))
            dist.all_gather_into_tensor(torch.zeros(8 * WORLD), torch.zeros(8))
            dist.reduce_scatter_tensor(output=torch.zeros(8), input=torch.zeros(8 * WORLD))  # keywords bind too
            dist.broadcast(torch.zeros(64), src=0)
            dist.all_to_all_single(torch.zeros(64), torch.zeros(64))
            splits = [0, 1, 2, 0, 0, 1, 4, 0]  # rows of 3 floats to ranks 0-7; rank 1 keeps its own row
            dist.all_to_all_single(torch.zeros(8, 3), torch.zeros(8, 3), [1] * WORLD, splits)
            dist.send(torch.zeros(4), dst=5)
            dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.zeros(2), 2)])
        sent = counter.traffic.as_dict()
    chunk = 8 * F32
    assert sent["all_reduce"] == {**_ring_split(2 * (WORLD - 1) / WORLD * 64 * F32), "calls": 1}
    assert sent["all_gather"] == {**_ring_split((WORLD - 1) * chunk), "calls": 1}
    assert sent["reduce_scatter"] == {**_ring_split((WORLD - 1) * chunk), "calls": 1}
    assert sent["broadcast"] == {**_ring_split(64 * F32 * (WORLD - 1) / WORLD), "calls": 1}
    row = 3 * F32  # node 0 holds ranks 0-3: rank 1 sends chunks to 0, 2, 3 inside it, to 4-7 outside
    per_peer = 64 * F32 // WORLD
    intra = 3 * per_peer + (splits[0] + splits[2] + splits[3]) * row
    inter = 4 * per_peer + sum(splits[4:]) * row
    assert sent["all_to_all"] == {"intra": intra, "inter": inter, "calls": 2}
    assert sent["send_recv"] == {"intra": 2 * F32, "inter": 4 * F32, "calls": 2}  # to rank 2, then rank 5


def test_the_groups_own_ranks_decide_the_links():
    with fake_world(5, WORLD):
        across, inside = dist.new_group([1, 5]), dist.new_group([4, 5])
        counter = WireCounter(rank=5, ranks_per_node=PER_NODE)
        with counter:
            dist.all_gather_into_tensor(torch.zeros(2 * 16), torch.zeros(16), group=across)
            dist.all_reduce(torch.zeros(16), group=inside)
        sent = counter.traffic.as_dict()
    assert sent["all_gather"] == {"intra": 0, "inter": 16 * F32, "calls": 1}  # a ring of 2 on 2 nodes
    assert sent["all_reduce"] == {"intra": 16 * F32, "inter": 0, "calls": 1}  # 2 x (1/2) x S, one node


def test_the_canonical_all_reduce_moves_a_ring_all_reduces_bytes():
    with fake_world(1, WORLD):
        counter = WireCounter(rank=1, ranks_per_node=PER_NODE)
        with counter:
            tree_all_reduce(torch.zeros(64))
            dist.all_reduce(torch.zeros(64))
    kind = "all_reduce (canonical all-to-all + all-gather)"
    canonical, ring = counter.traffic.as_dict()[kind], counter.traffic.as_dict()["all_reduce"]
    assert canonical["intra"] + canonical["inter"] == ring["intra"] + ring["inter"]
    # its all-to-all sends each peer 1/8 exactly (4 of 7 peers on the other node), its all-gather is a ring
    per_peer, mine = 64 * F32 // WORLD, 64 * F32 // WORLD
    assert canonical["inter"] == 4 * per_peer + _ring_split((WORLD - 1) * mine)["inter"]
    as_ring = counter.as_ring.as_dict()
    assert {k: as_ring[kind][k] for k in ("intra", "inter")} == {k: ring[k] for k in ("intra", "inter")}


def test_the_two_level_all_reduce_sends_a_hierarchical_rings_bytes_between_nodes():
    """dp_shard 8 on 2 nodes of 4: runs of g = 4 inside each node, n = 2 runs. Of S bytes, a hierarchical
    ring all-reduce sends 2 x S/G x (N-1)/N between nodes per rank; a flat canonical one sends more."""
    size = 64 * F32
    dims = ParallelDims(pp=1, dp_replicate=1, dp_shard=WORLD, tp=1)
    with fake_world(1, WORLD):
        levels = axis_levels(build_mesh(dims, torch.device("cpu")), "dp_shard", PER_NODE)
        assert (levels.inner_size, levels.outer_size) == (PER_NODE, WORLD // PER_NODE)
        counter = WireCounter(rank=1, ranks_per_node=PER_NODE)
        with counter:
            tree_all_reduce(torch.zeros(64), levels=levels)
        flat = WireCounter(rank=1, ranks_per_node=PER_NODE)
        with flat:
            tree_all_reduce(torch.zeros(64), group=levels.group)
    kind = "all_reduce (canonical all-to-all + all-gather)"
    nodes = WORLD // PER_NODE
    floor = 2 * size / PER_NODE * (nodes - 1) / nodes
    two_level, hierarchical = counter.traffic.as_dict()[kind], counter.hierarchical.as_dict()[kind]
    assert two_level["inter"] == hierarchical["inter"] == floor
    assert two_level["intra"] + two_level["inter"] == 2 * (WORLD - 1) / WORLD * size  # a ring's total
    assert flat.traffic.as_dict()[kind]["inter"] > floor


def test_counting_stops_with_the_block():
    original = dist.all_reduce
    with fake_world(1, WORLD):
        counter = WireCounter(rank=1, ranks_per_node=PER_NODE)
        with counter:
            assert dist.all_reduce is not original
            dist.all_reduce(torch.zeros(8))
        assert dist.all_reduce is original
        dist.all_reduce(torch.zeros(8))
    assert counter.traffic.calls["all_reduce"] == 1


def test_ring_model_splits_bytes_by_node():
    """A ring over ranks 0-3 with 2 ranks per node crosses nodes twice in 4 hops: half its bytes leave the
    node; an all-to-all's chunks to the other node are inter-node, exactly; as rings, a canonical
    reduction moves the same bytes with the ring's split."""
    counter = WireCounter(rank=0, ranks_per_node=2)
    counter.ring("all_gather", [0, 1, 2, 3], 3000)
    counter.direct("reduce_scatter (canonical all-to-all)", [0, 1, 2, 3], [100, 100, 100, 100], reduction=True)
    counter.direct("all_to_all", [0, 1, 2, 3], [100, 100, 100, 100])
    sent = counter.traffic.as_dict()
    assert sent["all_gather"] == {"intra": 1500, "inter": 1500, "calls": 1}
    assert sent["reduce_scatter (canonical all-to-all)"] == {"intra": 100, "inter": 200, "calls": 1}
    as_ring = counter.as_ring.as_dict()
    assert as_ring["reduce_scatter (canonical all-to-all)"] == {"intra": 150, "inter": 150, "calls": 1}
    assert as_ring["all_to_all"] == sent["all_to_all"]  # token dispatch is an all-to-all by nature
