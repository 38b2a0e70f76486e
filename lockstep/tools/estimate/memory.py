"""Live bytes per term while a step runs, and the peak of each phase: a dispatch mode that watches every
storage an op creates (fake or real), with O(1) work per op.

torch's ``MemTracker`` answers the same question but revisits every live storage after every op, which
at a large model's thousands of live tensors takes minutes; this one keeps running totals instead, and
follows the in-place storage resizes with which FSDP frees and re-allocates unsharded parameters.

A storage's term is decided when it appears, and changed only by ``mark``:

- ``parameters``, ``buffers``, ``gradients``, ``optimizer``: marked by the caller (a gradient when it
  lands, so FSDP's reduce-scatter output becomes a gradient);
- a label in force (``label``): ``unsharded_parameters`` (FSDP's all-gathers), ``reduction_buffers``
  (FSDP's gradient reduction with the canonical tree's buffers, the replicate axis's buckets), ``attention``, ``routed_experts``
  (dispatch buffers, the per-source gradient tree, the experts' activations), ``logits_and_loss``;
- otherwise the phase: ``activations`` in forward (what the forward saves, plus temporaries),
  ``backward`` inside autograd's backward (activation gradients, recomputation), ``optimizer`` in the
  optimizer step (its temporaries; the state was marked before).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable

import torch
from torch._guards import active_fake_mode
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from lockstep.parallel.canonical import local_tensor

TERMS = (
    "parameters", "buffers", "gradients", "optimizer", "unsharded_parameters", "reduction_buffers",
    "attention", "routed_experts", "logits_and_loss", "activations", "backward",
)  # fmt: skip


class StorageTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list] = {}  # storage key -> [nbytes, term, weakref to the storage]
        self.totals = dict.fromkeys(TERMS, 0)
        self.current = 0
        self.phase = "forward"
        self._labels: list[str] = []
        self._unseen = 0
        """Inside DTensor's sharding propagation, whose fake tensors (on the estimate's own fake mode when one
        is active) only carry shapes."""
        self._windows: list[str] = []
        self.peaks: dict[str, dict[str, int]] = {}
        """Per window of the step, the terms at its peak. The windows are the moments that recur in every
        step in the same place whatever the model's depth: ``forward``, ``backward``, each gradient
        reduction kind (``window``: e.g. a block's and the root's), ``optimizer``. Each window's peak is
        linear in the number of blocks, which lets the estimate trace a shallow model and extrapolate."""

    @contextlib.contextmanager
    def phase_of(self, phase: str):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    @contextlib.contextmanager
    def label(self, term: str):
        self._labels.append(term)
        try:
            yield
        finally:
            self._labels.pop()

    @contextlib.contextmanager
    def window(self, name: str):
        self._windows.append(name)
        try:
            yield
        finally:
            self._windows.pop()

    def _current_window(self) -> str:
        if self._windows:
            return self._windows[-1]
        if self.phase == "optimizer":
            return "optimizer"
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def labelled(self, fn: Callable, term: str) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with self.label(term):
                return fn(*args, **kwargs)

        return call

    def _new_term(self) -> str:
        if self._labels:
            return self._labels[-1]
        if self.phase == "optimizer":
            return "optimizer"
        return "backward" if torch._C._current_graph_task_id() != -1 else "activations"

    def _add(self, storage: torch.UntypedStorage, term: str | None) -> None:
        key = storage._cdata
        entry = self._live.get(key)
        if entry is not None:
            if term is not None and entry[1] != term:
                self._move(entry, term)
            return
        nbytes = storage.nbytes()
        term = term or self._new_term()
        entry = [nbytes, term, weakref.ref(storage, lambda _, key=key: self._free(key))]
        self._live[key] = entry
        self.totals[term] += nbytes
        self.current += nbytes
        self._update_peak()

    def _move(self, entry: list, term: str) -> None:
        self.totals[entry[1]] -= entry[0]
        self.totals[term] += entry[0]
        entry[1] = term

    def _update_peak(self) -> None:
        window = self._current_window()
        best = self.peaks.get(window)
        if best is None or self.current > sum(best.values()):
            self.peaks[window] = dict(self.totals)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.totals[entry[1]] -= entry[0]
            self.current -= entry[0]

    def _resized(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        entry = self._live.get(storage._cdata)
        if entry is None:
            self._add(storage, None)
            return
        if entry[0] == 0 and self._labels:  # re-allocated under a label (FSDP's unsharded parameters)
            self._move(entry, self._labels[-1])
        delta, entry[0] = nbytes - entry[0], nbytes
        self.totals[entry[1]] += delta
        self.current += delta
        self._update_peak()

    def mark(self, tensors: Iterable[torch.Tensor | None], term: str) -> None:
        """Count these tensors' storages as `term` (a DTensor: its local shard)."""
        for t in tensors:
            if t is not None:
                self._add(local_tensor(t).untyped_storage(), term)

    def __enter__(self) -> StorageTracker:
        original = self._original_resize = torch.UntypedStorage.resize_

        def resize_(storage, nbytes):
            result = original(storage, nbytes)
            self._resized(storage, int(nbytes))
            return result

        torch.UntypedStorage.resize_ = resize_
        propagate = self._original_propagate = ShardingPropagator._propagate_tensor_meta_non_cached

        def propagate_unseen(propagator, *args, **kwargs):
            self._unseen += 1
            try:
                return propagate(propagator, *args, **kwargs)
            finally:
                self._unseen -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = propagate_unseen
        self._fake_mode = active_fake_mode()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        torch.UntypedStorage.resize_ = self._original_resize
        ShardingPropagator._propagate_tensor_meta_non_cached = self._original_propagate
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):  # let DTensor run its local ops, which come back through here
            return NotImplemented
        if func is torch.ops._c10d_functional.wait_tensor.default and active_fake_mode() is not None:
            return args[0]  # the fake kernel makes a new tensor; the real one waits in place
        out = func(*args, **(kwargs or {}))
        if self._unseen or active_fake_mode() is not self._fake_mode:  # DTensor's shape propagation
            return out
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for plain in _plain_tensors(t):
                    self._add(plain.untyped_storage(), None)
        return out


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that hold a tensor's memory: itself, or a wrapper subclass's inner tensors (a DTensor's
    shard, a pending collective's result), whose ops run below this mode and are not seen here."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    inner = (getattr(t, name) for name in names)
    return [plain for t in inner if isinstance(t, torch.Tensor) for plain in _plain_tensors(t)]
