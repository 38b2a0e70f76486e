"""lockstep.tools.estimate.measure's allocator instrument: the peak is the highest running sum of the
CPU allocator's allocations and frees, in the order it saw them (a freed tensor's bytes are not counted
with what is allocated after it). The expected peak is the running sum of the test's own tensors."""

import torch
from torch.profiler import ProfilerActivity, profile

from lockstep.tools.estimate.measure import _peak_of_allocations

MB = 1 << 20


def test_the_allocator_peak_is_the_highest_running_sum_in_order():
    events = [("a", 4 * MB), ("a", None), ("b", 1 * MB), ("c", 2 * MB), ("d", 2 * MB), ("b", None)]
    held = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        for name, nbytes in events:
            if nbytes is None:
                del held[name]
            else:
                held[name] = torch.empty(nbytes, dtype=torch.uint8)
    current = expected = 0
    sizes = {}
    for name, nbytes in events:
        if nbytes is None:
            current -= sizes.pop(name)
        else:
            sizes[name] = nbytes
            current += nbytes
        expected = max(expected, current)
    assert expected < sum(n for _, n in events if n)  # the frees matter here
    assert _peak_of_allocations(profiler) == expected
