"""The sample order: which window is global sample g, as a pure function of (seed, g), in O(1) memory.

Global sample g of the run lies in epoch g // W (W windows) at position g % W of that epoch's
permutation. The permutation is not stored: it is a keyed bijection computed per index, a balanced
Feistel network over the smallest 2k-bit domain holding W, walked in cycles back into [0, W)
(Black and Rogaway's cycle walking; the domain is under 4W, so under 4 rounds of walking on average).
Each epoch gets its own round keys, drawn from (seed, epoch); nothing grows with the dataset, so a
trillion-token corpus costs what a small one does. The samples of a step are the same however many
ranks read them, and a resumed run needs only the next global sample index.

Quality: 6 rounds of a Feistel network whose round function is the splitmix64 finaliser of (half
xor key) (a 64-bit mixer with full avalanche). Luby and Rackoff show 4 rounds of a pseudo-random
function give a pseudo-random permutation; 6 leave a margin for a mixer that is not a PRF. That a
result is a true permutation holds for any keys (a Feistel network is invertible, cycle walking on a
bijection is a bijection) and is tested exhaustively on small sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_DATA_STREAM = 0xDA7A
"""Separates the data-order stream from every other stream derived from the root seed."""
ROUNDS = 6
ORDER_VERSION = 2
"""Recorded in the loader's checkpoint state: 1 was a stored PCG64 permutation per epoch, 2 this
Feistel network. A resume across versions would read other windows, so it is refused by default."""


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping multiplication)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass
class SampleOrder:
    seed: int
    num_windows: int
    shuffle: bool = True
    """False: window g % W for global sample g (epoch after epoch in file order, as torchtitan reads),
    as much a pure function of g as the shuffled order, so it is layout-invariant too."""
    _half_bits: int = field(init=False, repr=False)
    _keys: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    """Round keys of the most recently used epoch (one entry: memory stays O(1))."""

    def __post_init__(self) -> None:
        if self.num_windows < 1:
            raise ValueError(f"a sample order needs at least one window, got {self.num_windows}")
        bits = max(1, (self.num_windows - 1).bit_length())
        self._half_bits = (bits + 1) // 2

    def _round_keys(self, epoch: int) -> np.ndarray:
        keys = self._keys.get(epoch)  # one read: the read-ahead thread may replace the dict meanwhile
        if keys is None:
            keys = np.random.SeedSequence([self.seed, epoch, _DATA_STREAM]).generate_state(ROUNDS, dtype=np.uint64)
            self._keys = {epoch: keys}
        return keys

    def _feistel(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """One pass of the network over the 2k-bit domain (a bijection of it)."""
        k = np.uint64(self._half_bits)
        mask = np.uint64((1 << self._half_bits) - 1)
        left, right = x >> k, x & mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
        return (left << k) | right

    def _permute(self, positions: np.ndarray, epoch: int) -> np.ndarray:
        keys = self._round_keys(epoch)
        x = self._feistel(positions, keys)
        outside = x >= self.num_windows
        while outside.any():  # cycle walking: apply again until the value lands inside [0, W)
            x[outside] = self._feistel(x[outside], keys)
            outside = x >= self.num_windows
        return x

    def window_of(self, global_sample: int) -> int:
        return self.windows_of([global_sample])[0]

    def windows_of(self, global_samples: range | list[int]) -> list[int]:
        samples = np.asarray(list(global_samples) if not isinstance(global_samples, range) else global_samples)
        samples = samples.astype(np.uint64)
        epochs, positions = np.divmod(samples, np.uint64(self.num_windows))
        if not self.shuffle:
            return positions.astype(np.int64).tolist()
        windows = np.empty_like(positions)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            windows[in_epoch] = self._permute(positions[in_epoch], int(epoch))
        return windows.astype(np.int64).tolist()
