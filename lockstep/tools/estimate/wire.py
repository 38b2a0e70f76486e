"""Bytes on the wire, per peer, counted where every collective is called.

``WireCounter`` wraps the ``torch.distributed`` collectives (what FSDP2, pipelining, lockstep's
canonical reductions and expert parallelism call) and watches the functional collectives that DTensor
(tensor parallelism) dispatches, and records, for the calling rank, what each call sends to which
peer. The same counter runs inside ``lockstep estimate`` (a fake process group on fake tensors) and
around a real gloo run in the tests, so the two are compared call for call.

What a call sends, by algorithm (NCCL's, which is what a GPU run uses):

- all-gather and reduce-scatter of n ranks run as a ring: each rank sends (n-1) chunks to its ring
  successor; all-reduce is a reduce-scatter plus an all-gather, twice that;
- all-to-all sends each peer its own chunk directly;
- send/recv go to their peer; broadcast is a pipelined ring (each rank but the last forwards the buffer).

A ring's traffic leaves the node only where two neighbours of the ring sit on different nodes. NCCL
spreads its rings over every GPU's network rail, so the inter-node bytes per rank are the ring's total
inter-node bytes shared evenly over its ranks: (sent) x (node crossings of the ring) / n. An all-to-all's
inter-node bytes are exact: the chunks addressed to ranks of other nodes.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_WRAPPED = (
    "all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_to_all_single", "all_gather",
    "reduce_scatter", "broadcast", "send", "batch_isend_irecv",
)  # fmt: skip


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Traffic:
    """One rank's bytes per collective kind, split by link class."""

    sent: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: {"intra": 0, "inter": 0}))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, intra: float, inter: float) -> None:
        self.sent[kind]["intra"] += round(intra)
        self.sent[kind]["inter"] += round(inter)
        self.calls[kind] += 1

    def total(self, link: str) -> int:
        return sum(by_link[link] for by_link in self.sent.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {kind: {**by_link, "calls": self.calls[kind]} for kind, by_link in sorted(self.sent.items())}


class WireCounter:
    """Counts what this rank sends, per collective kind and link class, while active.

    `rank` and `ranks_per_node` place every global rank on a node (rank // ranks_per_node)."""

    def __init__(self, rank: int, ranks_per_node: int) -> None:
        self.rank, self.ranks_per_node = rank, ranks_per_node
        self.traffic = Traffic()
        self.as_ring = Traffic()
        """The same calls with every all-to-all moved as a ring of the same bytes per rank: what NCCL's own
        reduce-scatter would send for lockstep's canonical one."""
        self.hierarchical = Traffic()
        """The same calls with every reduction and gather moved as a hierarchical ring (inside the node,
        then across nodes): of a collective over N nodes of G ranks on S bytes, S/G x (N-1)/N between
        nodes per rank, twice for an all-reduce. The floor the canonical reductions are held to."""
        self._stack = contextlib.ExitStack()
        self._depth = 0

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def _ranks(self, group) -> list[int]:
        if group is None:
            return list(range(dist.get_world_size()))
        return dist.get_process_group_ranks(group)

    def ring(self, kind: str, ranks: list[int], sent: float) -> None:
        """`sent` bytes leave this rank along a ring over `ranks` (in group order)."""
        n = len(ranks)
        if n <= 1 or sent == 0:
            return
        inter = sent * self._crossings(ranks) / n
        self.traffic.add(kind, sent - inter, inter)
        self.as_ring.add(kind, sent - inter, inter)
        self._add_hierarchical(kind, ranks, sent)

    def _add_hierarchical(self, kind: str, ranks: list[int], sent: float) -> None:
        """`sent` bytes of a reduction or gather over `ranks` (a ring's (n-1)/n of each buffer of S bytes
        it moves), as a hierarchical ring would split them between the links."""
        n, per_node = len(ranks), defaultdict(int)
        for rank in ranks:
            per_node[self.node(rank)] += 1
        nodes = len(per_node)
        inter = sent * n / (n - 1) / (n / nodes) * (nodes - 1) / nodes
        self.hierarchical.add(kind, sent - inter, inter)

    def _crossings(self, ranks: list[int]) -> int:
        n = len(ranks)
        return sum(self.node(ranks[i]) != self.node(ranks[(i + 1) % n]) for i in range(n))

    def direct(self, kind: str, ranks: list[int], bytes_to: list[float], reduction: bool = False) -> None:
        """bytes_to[i] bytes go straight to group rank i; a `reduction` could have been a ring instead."""
        if len(ranks) <= 1:
            return
        mine = self.node(self.rank)
        inter = sum(b for r, b in zip(ranks, bytes_to, strict=True) if r != self.rank and self.node(r) != mine)
        intra = sum(b for r, b in zip(ranks, bytes_to, strict=True) if r != self.rank and self.node(r) == mine)
        self.traffic.add(kind, intra, inter)
        if not reduction:
            self.as_ring.add(kind, intra, inter)
            self.hierarchical.add(kind, intra, inter)
            return
        self._add_hierarchical(kind, ranks, intra + inter)
        ring_inter = (intra + inter) * self._crossings(ranks) / len(ranks)
        self.as_ring.add(kind, intra + inter - ring_inter, ring_inter)

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        bound = _BINDERS[name](*args, **kwargs)
        group = bound.get("group")
        if name == "batch_isend_irecv":
            for op in bound["p2p_op_list"]:
                if op.op in (dist.isend, dist.send):
                    self._p2p(op.tensor, op.peer, None, global_rank=True)  # peer: a global rank
            return
        if name == "send":
            self._p2p(bound["tensor"], bound["dst"], group, global_rank=True)
            return
        ranks = self._ranks(group)
        n = len(ranks)
        canonical = _canonical_caller() if name in _CANONICAL_PARTS else ""
        if canonical and name == "all_to_all_single":
            self.all_to_all(ranks, bound["input"], bound.get("input_split_sizes"), kind=canonical)
            return
        if canonical:
            self.ring(canonical, ranks, (n - 1) * _nbytes(bound["input_tensor"]))
            return
        if name in ("all_gather_into_tensor", "all_gather_single"):
            self.ring("all_gather", ranks, (n - 1) * _nbytes(bound["input_tensor"]))
        elif name == "all_gather":
            self.ring("all_gather", ranks, (n - 1) * _nbytes(bound["tensor"]))
        elif name in ("reduce_scatter_tensor", "reduce_scatter_single"):
            self.ring("reduce_scatter", ranks, (n - 1) * _nbytes(bound["output"]))
        elif name == "reduce_scatter":
            self.ring("reduce_scatter", ranks, (n - 1) * _nbytes(bound["output"]))
        elif name == "all_reduce":
            self.ring("all_reduce", ranks, 2 * (n - 1) / n * _nbytes(bound["tensor"]))
        elif name == "broadcast":
            self.ring("broadcast", ranks, _nbytes(bound["tensor"]) * (n - 1) / n)
        elif name == "all_to_all_single":
            self.all_to_all(ranks, bound["input"], bound.get("input_split_sizes"))

    def all_to_all(self, ranks: list[int], tensor: torch.Tensor, splits, kind: str = "all_to_all") -> None:
        n = len(ranks)
        if splits:
            row = _nbytes(tensor) // max(tensor.shape[0], 1) if tensor.dim() else tensor.element_size()
            bytes_to = [s * row for s in splits]
        else:
            bytes_to = [_nbytes(tensor) / n] * n
        self.direct(kind, ranks, bytes_to, reduction=kind != "all_to_all")

    def _p2p(self, tensor: torch.Tensor, peer: int, group, global_rank: bool = False) -> None:
        target = peer if global_rank or group is None else dist.get_global_rank(group, peer)
        mine = self.node(self.rank) == self.node(target)
        for traffic in (self.traffic, self.as_ring, self.hierarchical):
            traffic.add("send_recv", _nbytes(tensor) if mine else 0, 0 if mine else _nbytes(tensor))

    def _wrap(self, name: str):
        original = getattr(dist, name)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self._depth == 0:  # one collective may be built on another: count the outer call
                self._record(name, args, kwargs)
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return original, counted

    def __enter__(self) -> WireCounter:
        for name in _WRAPPED:
            original, counted = self._wrap(name)
            setattr(dist, name, counted)
            self._stack.callback(setattr, dist, name, original)
        self._stack.enter_context(_FunctionalCollectives(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


class _FunctionalCollectives(TorchDispatchMode):
    """DTensor's collectives (tensor parallelism, loss parallelism) go through the functional ops."""

    _OPS = {"all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_to_all_single"}

    def __init__(self, counter: WireCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func.namespace, func._opname
        if namespace in ("_c10d_functional", "_c10d_functional_autograd") and name in self._OPS:
            self._record(name, args)
        return func(*args, **kwargs)

    def _record(self, name: str, args: tuple) -> None:
        group = dist.distributed_c10d._resolve_process_group(args[-1])
        ranks = dist.get_process_group_ranks(group)
        n, tensor = len(ranks), args[0]
        if name == "all_gather_into_tensor":
            self.counter.ring("all_gather", ranks, (n - 1) * _nbytes(tensor))
        elif name in ("reduce_scatter_tensor", "reduce_scatter_single"):
            self.counter.ring("reduce_scatter", ranks, (n - 1) * _nbytes(tensor) / n)
        elif name == "all_reduce":
            self.counter.ring("all_reduce", ranks, 2 * (n - 1) / n * _nbytes(tensor))
        else:
            self.counter.all_to_all(ranks, tensor, args[2])


_CANONICAL = {
    "TreeReduceScatter.__call__": "reduce_scatter (canonical all-to-all)",
    "tree_all_reduce": "all_reduce (canonical all-to-all + all-gather)",
    "ReplicaGradientSum._launch": "all_reduce (canonical all-to-all + all-gather)",
    "ReplicaGradientSum._launch_nodes": "all_reduce (canonical all-to-all + all-gather)",
    "ReplicaGradientSum.finish": "all_reduce (canonical all-to-all + all-gather)",
}
"""lockstep's canonical reductions, named by the outermost lockstep function that calls the collective
(a reduce-scatter's two levels, inside and across nodes, count as one kind)."""


_CANONICAL_PARTS = ("all_to_all_single", "all_gather_into_tensor", "all_gather_single")
"""What the canonical reductions are built of; the same callers' other collectives (the native path's
``all_reduce``) are counted as themselves."""


def _canonical_caller(depth: int = 6) -> str:
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            break
        if (kind := _CANONICAL.get(frame.f_code.co_qualname)) is not None:
            return kind
        frame = frame.f_back
    return ""


def _binder(*names: str, **defaults):
    def bind(*args, **kwargs):
        bound = dict(defaults)
        bound.update(zip(names, args, strict=False))
        bound.update(kwargs)
        return bound

    return bind


_BINDERS = {
    "all_gather_into_tensor": _binder("output_tensor", "input_tensor", "group"),
    "all_gather_single": _binder("output_tensor", "input_tensor", "group"),
    "reduce_scatter_single": _binder("output", "input", "op", "group"),
    "reduce_scatter_tensor": _binder("output", "input", "op", "group"),
    "all_reduce": _binder("tensor", "op", "group"),
    "all_to_all_single": _binder("output", "input", "output_split_sizes", "input_split_sizes", "group"),
    "all_gather": _binder("tensor_list", "tensor", "group"),
    "reduce_scatter": _binder("output", "input_list", "op", "group"),
    "broadcast": _binder("tensor", "src", "group"),
    "send": _binder("tensor", "dst", "group"),
    "isend": _binder("tensor", "dst", "group"),
    "batch_isend_irecv": _binder("p2p_op_list"),
}
