"""One CPU process plays rank r of a W-rank job through the real code: a process group in which every
peer holds what this rank holds.

torch's fake process group completes collectives without filling their outputs, which is enough for
fake tensors but not for a real trainer: an all-gathered parameter would be uninitialised memory and an
object collective would unpickle garbage. Here every collective completes as if all W ranks had sent
this rank's data: an all-gather repeats the input W times, a reduce-scatter keeps this rank's chunk, a
sum multiplies by W, a broadcast keeps what this rank holds. Shapes, sharding and the code paths are the
job's; the values are those of a job whose ranks all agree, which keeps training finite.

Three things cannot be mirrored, and are played instead:

- a broadcast of Python objects leaves each rank's own objects (the trainer broadcasts only values the
  ranks already agree on when a seed is configured);
- a new group asked for by backend name (a checkpoint's gloo group) is a mirror group too;
- DCP's planning gathers every rank's plan on the coordinator. Rank r plans alone, its plan in place r
  of W (the other places empty), so it writes its own files under its own name. The coordinator's
  share on rank r != 0 (writing ``.metadata``, reading it for the others) runs uncounted: it is rank
  0's work, done here only so that the load which follows finds it. DCP's check that the plans' chunks
  fill every tensor is off: one rank's chunks fill only its shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from unittest import mock

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.distributed.checkpoint import default_planner
from torch.distributed.checkpoint.utils import _DistWrapper
from torch.distributed.tensor import DTensor
from torch.futures import Future
from torch.testing._internal.distributed.fake_pg import FakeStore

from lockstep.tools.scale.io_counter import not_counted

BACKEND = "mirror"


def _completed(result: object = None) -> dist.Work:
    future: Future = Future()
    future.set_result(result)
    return _create_work_from_future(future)


def _op(opts: object) -> object:
    return getattr(opts, "reduceOp", dist.ReduceOp.SUM)


class MirrorGroup(dist.ProcessGroup):
    """Collectives over `size` ranks that all hold what this rank holds (see the module docstring)."""

    def __init__(self, rank: int, size: int) -> None:
        super().__init__(rank, size)
        self._rank, self._size = rank, size

    def getBackendName(self) -> str:
        return BACKEND

    @property
    def group_name(self) -> str:
        return dist.distributed_c10d._world.pg_names[self]

    @property
    def pg_name(self) -> str:
        return self.group_name

    def _summed(self, tensor: torch.Tensor, opts: object) -> None:
        if _op(opts) == dist.ReduceOp.SUM:
            tensor.mul_(self._size)

    def allreduce(self, tensors, opts=None):
        for tensor in tensors:
            self._summed(tensor, opts)
        return _completed(tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def barrier(self, opts=None):
        return _completed()

    def broadcast(self, tensors, opts=None):
        return _completed(tensors)

    def allgather(self, outputs, inputs, opts=None):
        for output_list, tensor in zip(outputs, inputs, strict=True):
            for output in output_list:
                output.copy_(tensor)
        return _completed(outputs)

    def allgather_coalesced(self, outputs, inputs, opts=None):
        return self.allgather(outputs, inputs, opts)

    def all_gather_single(self, output, tensor, opts=None):
        for chunk in output.chunk(self._size):
            chunk.copy_(tensor)
        return _completed([output])

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        for output, tensor in zip(outputs, inputs, strict=True):
            self.all_gather_single(output, tensor)
        return _completed(outputs)

    def gather(self, outputs, inputs, opts=None):
        return self.allgather(outputs, inputs, opts) if outputs else _completed()

    def scatter(self, outputs, inputs, opts=None):
        for output, pieces in zip(outputs, inputs or [[]] * len(outputs), strict=True):
            if pieces:
                output.copy_(pieces[self._rank])
        return _completed(outputs)

    def reduce(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def reduce_scatter(self, outputs, inputs, opts=None):
        for output, pieces in zip(outputs, inputs, strict=True):
            output.copy_(pieces[self._rank])
            self._summed(output, opts)
        return _completed(outputs)

    def reduce_scatter_single(self, output, tensor, opts=None):
        output.copy_(tensor.chunk(self._size)[self._rank])
        self._summed(output, opts)
        return _completed([output])

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        for output, tensor in zip(outputs, inputs, strict=True):
            self.reduce_scatter_single(output, tensor, opts)
        return _completed(outputs)

    def all_to_all_single(self, output, tensor, output_splits, input_splits, opts=None):
        """Each peer sends this rank what this rank sends it: with equal splits, the input itself."""
        if output.shape == tensor.shape:
            output.copy_(tensor)
        else:
            output.zero_()
        return _completed([output])

    def alltoall(self, outputs, inputs, opts=None):
        for output, tensor in zip(outputs, inputs, strict=True):
            output.copy_(tensor) if output.shape == tensor.shape else output.zero_()
        return _completed(outputs)


def _create(store, rank: int, size: int, timeout: timedelta) -> MirrorGroup:
    return MirrorGroup(rank, size)


if BACKEND not in dist.Backend.backend_list:
    dist.Backend.register_backend(BACKEND, _create, devices=["cpu"])


def clear_sharding_caches() -> None:
    """DTensor caches its sharding decisions by mesh, and meshes of two worlds compare equal while their
    groups differ: a process that plays several worlds clears them on the way in and out, so no world
    gets another's shard boxes."""
    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache_clear()
    propagator._propagate_tensor_meta_cached.cache_clear()
    torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ dispatch fast path's


def _alone(local: object, rank: int, world: int) -> list:
    """`local` in place `rank` of `world` entries, the other ranks' empty (a plan without items, or no
    results): DCP's coordinator then names this rank's files as the job would."""
    empty = dataclasses.replace(local, items=[]) if dataclasses.is_dataclass(local) else type(local)()
    return [local if r == rank else empty for r in range(world)]


def _planned_alone(self: _DistWrapper, step: str, map_fun: Callable, reduce_fun: Callable):
    local = map_fun()
    with contextlib.nullcontext() if self.is_coordinator else not_counted():
        return reduce_fun(_alone(local, self.rank, self.get_world_size()))[self.rank]


def _reduced_alone(self: _DistWrapper, step: str, map_fun: Callable, reduce_fun: Callable):
    local = map_fun()
    with contextlib.nullcontext() if self.is_coordinator else not_counted():
        return reduce_fun(_alone(local, self.rank, self.get_world_size()))


def _gathered_alone(self: _DistWrapper, step: str, map_fun: Callable) -> list:
    return [map_fun()]


def _coordinator_value(self: _DistWrapper, step: str, map_fun: Callable):
    with contextlib.nullcontext() if self.is_coordinator else not_counted():
        return map_fun()


def _covers_own_chunks(global_plan, metadata) -> list[str]:
    """DCP checks that the ranks' chunks fill every tensor; a rank planning alone fills its own only."""
    return []


def _objects_kept(object_list: list, src: int | None = None, group=None, device=None, group_src=None) -> None:
    """broadcast_object_list in a mirror world: the source holds what this rank holds."""


def _world_backend(original: Callable) -> Callable:
    def new_group(*args, backend=None, **kwargs):
        return original(*args, **kwargs)

    return new_group


@contextlib.contextmanager
def mirror_world(rank: int, world_size: int, ranks_per_node: int = 8) -> Iterator[None]:
    """This process is `rank` of `world_size` (torchrun's environment set, a mirror process group up)
    until the block ends."""
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank % ranks_per_node),
        "LOCAL_WORLD_SIZE": str(ranks_per_node),
    }
    patches = [
        mock.patch.dict(os.environ, env),
        mock.patch.object(dist, "broadcast_object_list", _objects_kept),
        mock.patch.object(dist, "new_group", _world_backend(dist.new_group)),
        mock.patch.object(_DistWrapper, "reduce_scatter", _planned_alone),
        mock.patch.object(_DistWrapper, "all_reduce", _reduced_alone),
        mock.patch.object(_DistWrapper, "all_gather", _gathered_alone),
        mock.patch.object(_DistWrapper, "broadcast", _coordinator_value),
        mock.patch.object(default_planner, "_validate_global_plan", _covers_own_chunks),
    ]
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", "Set timeout is now only supported")  # the trainer's timeouts
        for patch in patches:
            stack.enter_context(patch)
        clear_sharding_caches()
        stack.callback(clear_sharding_caches)
        dist.init_process_group(BACKEND, store=FakeStore(), rank=rank, world_size=world_size)
        stack.callback(lambda: dist.is_initialized() and dist.destroy_process_group())
        yield
