"""A mixture of prepared folders (``data.mixture``): their windows side by side, and the sample order over them.

Global sample g is served by source i = the interleaving's source of g (lockstep.data.interleave: exact
proportions, a function of g and the weights), as that source's k-th sample, and k picks the window by
the source's own SampleOrder, keyed by (seed, source name). So (source, window) is a pure function of
(seed, g): independent of the layout and of what was read before, and a resume needs only the global
next sample index. Each source's windows are visited as a permutation per epoch of that source (a small
source wraps into its next epoch, with a new permutation, while a large one is still in its first).
Memory is O(sources + Q): nothing grows with the data.

The mixture looks to the DataLoader like one TokenWindows whose window ids are the sources' windows
numbered one source after another (the sources sorted by name, so the order of the entries does not
matter); its fingerprint covers every source's name, normalised weight and manifest fingerprint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from lockstep.config.errors import ConfigError
from lockstep.config.mixture import KEY, parse_mixture
from lockstep.data.dataset import TokenWindows, load_prepared_windows
from lockstep.data.interleave import Interleave, interleave, period_counts
from lockstep.data.order import SampleOrder
from lockstep.data.prepared import read_manifest
from lockstep.data.tokenizer import Tokenizer


def mixture_fingerprint(names: list[str], shares: list[Fraction], fingerprints: list[str]) -> str:
    """sha256 over the sorted (name, normalised weight, manifest fingerprint) of every source."""
    rows = sorted(f"{n}\t{s}\t{f}" for n, s, f in zip(names, shares, fingerprints, strict=True))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def source_seed(seed: int, name: str) -> int:
    """The key of a source's own sample order: from the run's data seed and the source's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


@dataclass
class MixtureWindows:
    """Several sources' windows (same seq_len and tokenizer) as one TokenWindows-like set: window id
    offsets[i] + w is window w of source i."""

    names: list[str]
    shares: list[Fraction]
    """Normalised weights (sum 1)."""
    sources: list[TokenWindows] = field(repr=False)
    offsets: np.ndarray = field(init=False, repr=False)
    layout: Interleave = field(init=False, repr=False)
    """Which source serves each position of the period (lockstep.data.interleave)."""
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        if len({w.seq_len for w in self.sources}) != 1 or len({(w.bos_id, w.eos_id) for w in self.sources}) != 1:
            raise ValueError("the sources of a mixture must share seq_len and tokenizer")
        self.offsets = np.cumsum([0] + [w.num_windows for w in self.sources])
        self.layout = interleave(period_counts(self.shares))
        self.fingerprint = mixture_fingerprint(self.names, self.shares, [w.fingerprint for w in self.sources])

    @property
    def seq_len(self) -> int:
        return self.sources[0].seq_len

    @property
    def num_windows(self) -> int:
        return int(self.offsets[-1])

    def split(self, window_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(source, window within the source) of each window id."""
        ids = np.asarray(window_ids, dtype=np.int64)
        sources = np.searchsorted(self.offsets, ids, side="right") - 1
        return sources, ids - self.offsets[sources]

    def valid_tokens_by_source(self, window_ids: list[int]) -> dict[str, int]:
        """Loss-taking labels per source name (every source, 0 when absent), by each source's cheap
        path (its document index): no token is read."""
        sources, local = self.split(window_ids)
        return {
            name: windows.valid_tokens(local[sources == i].tolist()) if (sources == i).any() else 0
            for i, (name, windows) in enumerate(zip(self.names, self.sources, strict=True))
        }

    def valid_tokens(self, window_ids: list[int]) -> int:
        return sum(self.valid_tokens_by_source(window_ids).values())

    def batch(self, window_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) int64 [n, seq_len] in the order asked, each source's rows read by its own windows."""
        sources, local = self.split(window_ids)
        inputs = torch.empty(len(window_ids), self.seq_len, dtype=torch.int64)
        labels = torch.empty_like(inputs)
        for i in np.unique(sources).tolist():
            rows = torch.from_numpy(np.flatnonzero(sources == i))
            inputs[rows], labels[rows] = self.sources[i].batch(local[sources == i].tolist())
        return inputs, labels

    def sample_order(self, seed: int, shuffle: bool = True) -> MixtureOrder:
        return MixtureOrder(self, seed, shuffle)

    def summary(self) -> str:
        """One line for the run log: each source's normalised weight and samples per period."""
        period = self.layout.period
        parts = [
            f"{n} {float(s):.6g} ({c} of every {period} samples)"
            for n, s, c in zip(self.names, self.shares, self.layout.counts, strict=True)
        ]
        return f"data mixture: {', '.join(parts)}"


class MixtureOrder:
    """Which window id serves each global sample (the SampleOrder interface, for DataLoader)."""

    def __init__(self, windows: MixtureWindows, seed: int, shuffle: bool = True) -> None:
        self.windows = windows
        self.layout = windows.layout
        self.orders = [
            SampleOrder(source_seed(seed, name), w.num_windows, shuffle)
            for name, w in zip(windows.names, windows.sources, strict=True)
        ]

    def locate(self, global_samples: range | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(source index, window within that source) of each global sample."""
        sources, kth = self.layout.locate(np.asarray(global_samples, dtype=np.int64))
        local = np.empty_like(kth)
        for i in np.unique(sources).tolist():
            mine = sources == i
            local[mine] = self.orders[i].windows_of(kth[mine].tolist())
        return sources, local

    def windows_of(self, global_samples: range | list[int]) -> list[int]:
        sources, local = self.locate(global_samples)
        return (self.windows.offsets[sources] + local).tolist()

    def window_of(self, global_sample: int) -> int:
        return self.windows_of([global_sample])[0]


def load_mixture(entries: list[str], tokenizer: Tokenizer, seq_len: int) -> MixtureWindows:
    """The sources of ``data.mixture``, each a prepared folder read as load_prepared_windows reads one (no
    content is hashed). Sources prepared with different tokenizers are refused in one line, before the
    run's own tokenizer is compared with each."""
    parsed = sorted(parse_mixture(entries), key=lambda e: e.name)
    manifests = [read_manifest(Path(e.folder)) for e in parsed]
    tokenizers: dict[str, list[str]] = {}
    for entry, manifest in zip(parsed, manifests, strict=True):
        tokenizers.setdefault(manifest["tokenizer"]["fingerprint"], []).append(entry.name)
    if len(tokenizers) > 1:
        found = "; ".join(f"{', '.join(names)} with {fingerprint[:12]}" for fingerprint, names in tokenizers.items())
        raise ConfigError(
            KEY,
            f"the sources were prepared with different tokenizers: {found}; prepare them all with one tokenizer",
        )
    total = sum((e.weight for e in parsed), Fraction(0))
    windows = [load_prepared_windows(e.folder, tokenizer, seq_len, m) for e, m in zip(parsed, manifests, strict=True)]
    return MixtureWindows([e.name for e in parsed], [e.weight / total for e in parsed], windows)
