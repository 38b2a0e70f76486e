"""lockstep.data.order: the sample order is a true permutation per epoch, a pure function of (seed, g)
that keeps no state growing with the dataset, and reads windows in file order when unshuffled."""

from lockstep.data.order import SampleOrder


def test_sample_order_is_a_permutation_per_epoch():
    order = SampleOrder(seed=5, num_windows=50)
    first_epoch = order.windows_of(range(50))
    assert sorted(first_epoch) == list(range(50))
    assert order.windows_of(range(50, 100)) != first_epoch
    assert SampleOrder(seed=5, num_windows=50).window_of(73) == order.window_of(73)
    assert SampleOrder(seed=6, num_windows=50).windows_of(range(50)) != first_epoch


def test_sample_order_is_a_true_permutation_at_every_small_size():
    """Exhaustive: every size up to 600 (odd bit widths and cycle walking included), two epochs each."""
    for num_windows in [*range(1, 601), 4097]:
        order = SampleOrder(seed=num_windows, num_windows=num_windows)
        for epoch in range(2):
            windows = order.windows_of(range(epoch * num_windows, (epoch + 1) * num_windows))
            assert sorted(windows) == list(range(num_windows)), num_windows


def test_sample_order_holds_no_state_that_grows_with_the_dataset():
    """10^10 windows: any sample is computed on demand; what the order keeps is one epoch's round keys."""
    order = SampleOrder(seed=1, num_windows=10**10)
    windows = order.windows_of(range(3 * 10**10 - 4, 3 * 10**10 + 4))  # across the epoch 2 -> 3 boundary
    assert all(0 <= w < 10**10 for w in windows) and len(set(windows)) == len(windows)
    state = [v for v in vars(order).values() if hasattr(v, "__len__")]
    assert sum(len(v) for v in state) <= 1 and all(k.nbytes <= 64 for k in order._keys.values())


def test_unshuffled_order_reads_windows_in_file_order_epoch_after_epoch():
    order = SampleOrder(seed=3, num_windows=5, shuffle=False)
    assert order.windows_of(range(12)) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert SampleOrder(seed=3, num_windows=5).windows_of(range(5)) != [0, 1, 2, 3, 4]  # shuffled by default
