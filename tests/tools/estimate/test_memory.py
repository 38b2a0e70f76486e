"""lockstep.tools.estimate.memory: the StorageTracker keeps running totals of live storage bytes per
term, each storage counted once (views share it), under the term its creation decided (a label in
force, else the phase: activations in forward, backward inside autograd's backward, optimizer in the
optimizer step) until ``mark`` moves it; it follows frees and FSDP-style in-place resizes, and records
each window's totals at its peak. The byte figures here are derived from shapes and element sizes in
the test. This matters because `lockstep estimate` decides whether a layout fits from these totals: a
view counted twice, a free or a resize missed, or a mark that double-counts would shift the predicted
peak by whole tensors."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lockstep.tools.estimate.memory import TERMS, StorageTracker


def _nbytes(*shape: int, dtype=torch.float32) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * dtype.itemsize  # no tensor: the tracker would count it


def _nonzero(tracker: StorageTracker) -> dict[str, int]:
    return {term: n for term, n in tracker.totals.items() if n}


def test_forward_counts_each_storage_once_and_frees_it():
    tracker = StorageTracker()
    with tracker:
        a = torch.empty(16, 64)
        b = torch.empty(8, 3, dtype=torch.bfloat16)
        views = [a.view(64, 16), a[2:5], a.t()]
        assert _nonzero(tracker) == {"activations": _nbytes(16, 64) + _nbytes(8, 3, dtype=torch.bfloat16)}
        del a, views
        assert tracker.current == _nbytes(8, 3, dtype=torch.bfloat16) == tracker.totals["activations"]
        c = torch.empty(4)
        assert tracker.current == _nbytes(8, 3, dtype=torch.bfloat16) + _nbytes(4)
    peak = tracker.peaks["forward"]
    assert peak["activations"] == _nbytes(16, 64) + _nbytes(8, 3, dtype=torch.bfloat16) == sum(peak.values())
    assert set(peak) == set(TERMS)
    del b, c


def test_mark_moves_a_storage_between_terms_without_double_counting():
    tracker = StorageTracker()
    with tracker:
        t = torch.empty(10, 10)
        tracker.mark([t, t[0], None], "gradients")
        assert _nonzero(tracker) == {"gradients": _nbytes(10, 10)} and tracker.current == _nbytes(10, 10)
        outside = torch.ones(7)  # made here, so already counted; marking an unseen one adds it
    late = torch.ones(3, dtype=torch.float64)  # made before the tracker saw it
    with tracker:
        tracker.mark([outside, late], "optimizer")
    assert _nonzero(tracker) == {
        "gradients": _nbytes(10, 10),
        "optimizer": _nbytes(7) + _nbytes(3, dtype=torch.float64),
    }
    assert tracker.current == sum(tracker.totals.values())


def test_the_innermost_label_then_the_phase_decides_a_new_storages_term():
    tracker = StorageTracker()
    with tracker:
        with tracker.label("attention"):
            a = torch.empty(5)
            with tracker.label("logits_and_loss"):
                b = torch.empty(6)
            c = torch.empty(7)
        with tracker.phase_of("optimizer"):
            d = torch.empty(8)
            assert tracker.phase == "optimizer"
        assert tracker.phase == "forward"
        with tracker.window("reduce_block"):
            e = torch.empty(9)
        f = tracker.labelled(lambda: torch.empty(11), "routed_experts")()
    assert _nonzero(tracker) == {
        "attention": _nbytes(5) + _nbytes(7), "logits_and_loss": _nbytes(6), "optimizer": _nbytes(8),
        "activations": _nbytes(9), "routed_experts": _nbytes(11),
    }  # fmt: skip
    assert set(tracker.peaks) == {"forward", "optimizer", "reduce_block"}
    assert tracker.peaks["reduce_block"]["activations"] == _nbytes(9)
    del a, b, c, d, e, f


def test_storages_made_in_autograds_backward_count_as_backward():
    w = torch.randn(64, 32, requires_grad=True)
    tracker = StorageTracker()
    with tracker:
        tracker.mark([w], "parameters")
        x = torch.randn(16, 64)
        (x @ w).square().sum().backward()
        del x
        assert _nonzero(tracker) == {"parameters": _nbytes(64, 32), "backward": _nbytes(64, 32)}  # w.grad
        tracker.mark([w.grad], "gradients")
    assert _nonzero(tracker) == {"parameters": _nbytes(64, 32), "gradients": _nbytes(64, 32)}
    assert tracker.peaks["backward"]["backward"] >= _nbytes(64, 32)
    assert tracker.peaks["forward"]["activations"] >= _nbytes(16, 64) + _nbytes(16, 32)


def test_in_place_resizes_are_followed_and_a_labelled_regrowth_changes_term():
    original_resize = torch.UntypedStorage.resize_
    fake = FakeTensorMode()
    tracker = StorageTracker()
    with fake, tracker:
        param = torch.empty(250)
        storage = param.untyped_storage()
        storage.resize_(0)  # FSDP frees the unsharded parameter after use
        assert tracker.current == 0 and tracker.peaks["forward"]["activations"] == _nbytes(250)
        with tracker.label("unsharded_parameters"):
            storage.resize_(_nbytes(250))  # and all-gathers it again
        assert _nonzero(tracker) == {"unsharded_parameters": _nbytes(250)}
        storage.resize_(_nbytes(100))
        assert tracker.current == _nbytes(100)
    assert torch.UntypedStorage.resize_ is original_resize
    del param, storage
