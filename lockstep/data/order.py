"""The sample order: which window is global sample g, as a pure function of (seed, g).

Global sample g of the run lies in epoch g // W (W windows) at position g % W of that epoch's
permutation, drawn from PCG64 seeded with (seed, epoch). So the samples of step s are the same
however many ranks read them, and a resumed run needs only the next global sample index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_DATA_STREAM = 0xDA7A
"""Separates the data-order stream from every other stream derived from the root seed."""


@dataclass
class SampleOrder:
    seed: int
    num_windows: int
    _epoch: int = field(default=-1, repr=False)
    _permutation: np.ndarray | None = field(default=None, repr=False)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch, _DATA_STREAM]))
            self._permutation = rng.permutation(self.num_windows)
            self._epoch = epoch
        return self._permutation

    def window_of(self, global_sample: int) -> int:
        epoch, position = divmod(global_sample, self.num_windows)
        return int(self._epoch_permutation(epoch)[position])

    def windows_of(self, global_samples: range | list[int]) -> list[int]:
        return [self.window_of(g) for g in global_samples]
