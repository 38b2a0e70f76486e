"""The gradient sum over the replicate axis (DDP, or the replicas of HSDP), in buckets overlapped with
backward.

Each parameter's gradient is final on its rank once the step's last microbatch has reached it (the
local canonical tree, or FSDP's reduce-scatter, is done). A hook counts those arrivals; when every
gradient of a bucket is final the bucket is flattened and its cross-replica sum starts
asynchronously, while backward goes on producing the next buckets, the way DDP's reducer works.
``finish`` completes the sums and writes them back.

The canonical sum is ``tree_all_reduce`` split in two: the all-to-all starts from the hook, the local
pairwise tree over replicas (in rank order) and the all-gather run in ``finish``. Each element is
still summed by the same tree, so bucketing cannot change a bit; the native sum is one asynchronous
``all_reduce(SUM)`` per bucket, which fixes no order beyond two replicas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lockstep.parallel.canonical import combine_nodes, local_tensor
from lockstep.parallel.node_levels import AxisLevels, finish_all_reduce_levels


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    ready: int = 0
    flat: torch.Tensor | None = None
    """The bucket's gradients, flattened (padded to a multiple of the replica count when canonical)."""
    received: torch.Tensor | None = None
    work: dist.Work | None = None
    present: list[bool] = field(default_factory=list)
    """Which parameters had a gradient (a missing one is summed as zeros and left missing)."""


class ReplicaGradientSum:
    """Sums final gradients over the replicate axis, bucket by bucket as backward makes them final.

    ``watch(params, calls_per_step)`` says how often the gradient hook of each parameter runs per
    step: once per microbatch where gradients accumulate (or are reduce-scattered) every micro-step,
    once where FSDP syncs after the last microbatch only (pipeline stages). A bucket launches when
    all of its parameters have had their last call; ``finish`` launches any bucket whose hooks never
    ran (e.g. a schedule that writes ``.grad`` itself) and completes them all. A hook that runs more
    often than announced raises, since a bucket launched early would sum an unfinished gradient.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        *,
        layout_invariant_reductions: bool,
        bucket_bytes: int,
        levels: AxisLevels | None = None,
    ) -> None:
        """`levels`: the replicate axis split by node (``axis_levels``), for the canonical sum in two levels."""
        self.group = group
        self.layout_invariant_reductions = layout_invariant_reductions
        self.levels = levels or AxisLevels.flat(group)
        self.bucket_bytes = bucket_bytes
        self.replicas = dist.get_world_size(group)
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._expected: dict[int, int] = {}
        self._calls: dict[int, int] = {}
        self._microbatches = 1
        self._node_levels: list[list[int]] | None = None
        self._nodes_of = None
        self.launched_in_backward = 0
        """Buckets whose sum started from a hook in the last step (the rest started in ``finish``)."""

    def watch(self, params: list[nn.Parameter], per_microbatch: bool) -> None:
        """Bucket `params` (in reverse order: backward makes the last layers' gradients first) and hook
        them. Call in the model's parameter order; each call starts new buckets."""
        bucket: list[nn.Parameter] = []
        size = 0
        for p in reversed([p for p in params if p.requires_grad and id(p) not in self._bucket_of]):
            nbytes = local_tensor(p).numel() * local_tensor(p).element_size()
            if bucket and (size + nbytes > self.bucket_bytes or p.dtype != bucket[0].dtype):
                self._add_bucket(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += nbytes
            self._expected[id(p)] = 0 if per_microbatch else 1  # 0: one call per microbatch
            p.register_post_accumulate_grad_hook(self._on_gradient)
        if bucket:
            self._add_bucket(bucket)

    def _add_bucket(self, params: list[nn.Parameter]) -> None:
        bucket = _Bucket(params)
        self._buckets.append(bucket)
        for p in params:
            self._bucket_of[id(p)] = bucket

    def begin_step(self, num_microbatches: int, node_levels: list[list[int]] | None = None, nodes_of=None) -> None:
        """`node_levels` (one list per replica, in replica order): the replicas' blocks are these nodes
        of the canonical tree (``canonical_nodes``) rather than one node each; `nodes_of(param)` gives
        this replica's node sums (GradientTree.nodes). Every replica's nodes then cross, and the tree
        over all of them is finished per chunk."""
        self._node_levels = node_levels
        self._nodes_of = nodes_of
        for bucket in self._buckets:
            if bucket.work is not None:  # a step abandoned mid-way (a non-finite rerun): drain it
                bucket.work.wait()
            bucket.ready, bucket.flat, bucket.received, bucket.work = 0, None, None, None
        self._calls.clear()
        self._microbatches = num_microbatches
        self.launched_in_backward = 0

    def _on_gradient(self, param: torch.Tensor) -> None:
        key = id(param)
        calls = self._calls[key] = self._calls.get(key, 0) + 1
        last = self._expected[key] or self._microbatches
        if calls > last:
            raise RuntimeError(
                f"a gradient hook ran {calls} times this step, expected {last}; the replicate-axis sum "
                "would read an unfinished gradient"
            )
        if calls == last:
            bucket = self._bucket_of[key]
            bucket.ready += 1
            if bucket.ready == len(bucket.params):
                self._launch(bucket)
                self.launched_in_backward += 1

    @staticmethod
    def _flatten(params: list[nn.Parameter], grads: list[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat(
            [
                local_tensor(g).reshape(-1) if g is not None else torch.zeros_like(local_tensor(p)).reshape(-1)
                for p, g in zip(params, grads, strict=True)
            ]
        )

    def _launch(self, bucket: _Bucket) -> None:
        grads = [p.grad for p in bucket.params]
        bucket.present = [g is not None for g in grads]
        if self.layout_invariant_reductions and self._node_levels is not None:
            self._launch_nodes(bucket)
            return
        flat = self._flatten(bucket.params, grads)
        if not self.layout_invariant_reductions:
            bucket.flat = flat
            bucket.work = dist.all_reduce(flat, group=self.group, async_op=True)
            return
        chunk = -(-flat.numel() // self.replicas)
        bucket.flat = torch.zeros(self.replicas * chunk, dtype=flat.dtype, device=flat.device)
        bucket.flat[: flat.numel()] = flat
        bucket.received = torch.empty_like(bucket.flat)
        first_level = self.levels.inner if self.levels.inner is not None else self.levels.outer
        bucket.work = dist.all_to_all_single(bucket.received, bucket.flat, group=first_level, async_op=True)

    def _launch_nodes(self, bucket: _Bucket) -> None:
        """Send chunk j of each of this replica's nodes to replica j; replica j receives every replica's
        nodes for its chunk, in replica (= microbatch) order."""
        mine = len(self._node_levels[dist.get_rank(self.group)])
        per_param = [self._nodes_of(p) or [None] * mine for p in bucket.params]
        flats = [self._flatten(bucket.params, [nodes[i] for nodes in per_param]) for i in range(mine)]
        chunk = -(-flats[0].numel() // self.replicas)
        send = torch.zeros(self.replicas, mine, chunk, dtype=flats[0].dtype, device=flats[0].device)
        for i, flat in enumerate(flats):
            padded = torch.zeros(self.replicas * chunk, dtype=flat.dtype, device=flat.device)
            padded[: flat.numel()] = flat
            send[:, i] = padded.view(self.replicas, chunk)
        counts = [len(levels) for levels in self._node_levels]
        bucket.received = send.new_empty(sum(counts) * chunk)
        bucket.flat = send.new_zeros(self.replicas * chunk)
        bucket.work = dist.all_to_all_single(
            bucket.received, send.view(-1), [n * chunk for n in counts], [mine * chunk] * self.replicas,
            group=self.group, async_op=True,
        )  # fmt: skip

    def _reduce_received(self, bucket: _Bucket) -> torch.Tensor:
        levels = [level for replica in self._node_levels for level in replica]
        return combine_nodes(list(bucket.received.view(len(levels), -1).unbind(0)), levels)

    def finish(self) -> None:
        """Complete every bucket's sum and write it into the gradients, on every replica alike."""
        for bucket in self._buckets:
            if bucket.work is None:
                self._launch(bucket)
        gathers = []
        for bucket in self._buckets:
            bucket.work.wait()
            if self.layout_invariant_reductions and self._node_levels is None:  # the rest of the two-level sum
                finish_all_reduce_levels(bucket.flat, bucket.received, self.levels)
                bucket.received = None
            elif self.layout_invariant_reductions:  # this rank's chunk, summed over replicas in rank order, then shared
                reduced = self._reduce_received(bucket)
                bucket.received = None
                gathers.append(dist.all_gather_single(bucket.flat, reduced, group=self.group, async_op=True))
        for work in gathers:
            work.wait()
        for bucket in self._buckets:
            offset = 0
            for p, present in zip(bucket.params, bucket.present, strict=True):
                numel = local_tensor(p).numel()
                if present:
                    grad = local_tensor(p.grad)
                    grad.copy_(bucket.flat[offset : offset + numel].view_as(grad))
                offset += numel
            bucket.flat, bucket.work = None, None
