"""A train/validation split of one source: whole documents held out by a pure function of their index.

Document d (0-based, in the source's order: files sorted, then records in each file, as every prepared
folder stores them) is held out when a keyed 64-bit hash of d (splitmix64) falls below fraction x 2^64.
So the split depends on nothing but the fraction and the document's index: not on the shard cuts, the
number of ranks, nodes or workers, nor on the tokenizer or seq_len. The two sides are views of the same
prepared folder (no tokens are copied): training windows are cut from the kept documents packed end to
end, validation windows from the held-out ones, so no held-out token reaches a training window and the
two sides together are every document exactly once.

A view reads every shard's document index once at start-up (8 bytes per document) and keeps one span per
run of consecutive documents on its side: about fraction x documents spans on either side.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from lockstep.data.dataset import TokenWindows
from lockstep.data.prepared import ShardedTokens
from lockstep.errors import InputError

SPLIT_VERSION = 1
"""Part of each side's fingerprint: another assignment of documents would be refused on resume."""
_SPLIT_KEY = np.uint64(0x5EED_5917_0DA7_A000)
"""Separates the split's hash from the data order's (lockstep.data.order)."""
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def held_out(documents: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each document index (int64 array) belongs to the validation side (splitmix64 of the index)."""
    z = documents.astype(np.uint64) * _GOLDEN + _SPLIT_KEY
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z < np.uint64(min(round(fraction * 2.0**64), 2**64 - 1))


class DocumentSubset:
    """The documents of one side of a split, packed end to end, read as one token sequence: what
    TokenWindows asks of its tokens (``len``, slices, ints, int arrays, ``documents_starting_in``,
    ``shard_of``), answered from the prepared folder's ShardedTokens through a position map."""

    def __init__(self, base: ShardedTokens, keep: np.ndarray, document_starts: np.ndarray) -> None:
        """`keep` and `document_starts` (each document's first position in `base`) are per document."""
        ends = np.append(document_starts[1:], len(base)).astype(np.int64)
        first = keep & ~np.concatenate([[False], keep[:-1]])  # a kept document after a dropped one (or first)
        last = keep & ~np.concatenate([keep[1:], [False]])
        self.base = base
        self.base_starts = document_starts[first].astype(np.int64)
        """Where each run of consecutive kept documents starts in `base`."""
        lengths = ends[last] - self.base_starts
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        """Where each run starts in this sequence; the last entry is its length."""
        self.num_documents = int(keep.sum())

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def to_base(self, positions: np.ndarray) -> np.ndarray:
        """Positions of this sequence as positions of the prepared folder's stream."""
        runs = np.searchsorted(self.offsets, positions, side="right") - 1
        return self.base_starts[runs] + positions - self.offsets[runs]

    def _pieces(self, start: int, stop: int):
        """(base start, base stop) of each run's part of [start, stop)."""
        run = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.offsets[run + 1]))
            base = int(self.base_starts[run]) - int(self.offsets[run])
            yield start + base, end + base
            start, run = end, run + 1

    def documents_starting_in(self, start: int, stop: int) -> int:
        """Documents starting at a position in [start, stop): every run starts with one of its documents."""
        return sum(self.base.documents_starting_in(a, b) for a, b in self._pieces(start, min(stop, len(self))))

    def shard_of(self, position: int) -> Path:
        return self.base.shard_of(int(self.to_base(np.asarray([position]))[0]))

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            parts = [self.base[a:b] for a, b in self._pieces(start, max(start, stop))]
            whole = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.empty(0, self.base.dtype)
            return whole[::step] if step != 1 else whole
        if isinstance(key, (int, np.integer)):
            position = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"token {key} of {len(self)}")
            return self.base[int(self.to_base(np.asarray([position]))[0])]
        return self.base[self.to_base(np.asarray(key, dtype=np.int64))]


def document_starts(tokens: ShardedTokens) -> np.ndarray:
    """Every document's first position in the stream, in order (each shard's document index, offset)."""
    starts = [tokens._documents(i).astype(np.int64) + int(tokens.offsets[i]) for i in range(len(tokens.paths))]
    return np.concatenate(starts) if starts else np.empty(0, np.int64)


def split_windows(windows: TokenWindows, fraction: float, *, validation: bool, seq_len: int = 0) -> TokenWindows:
    """One side of the split of `windows` (read from a prepared folder): the held-out documents when
    `validation`, else the rest, as windows of `seq_len` (default: the windows' own)."""
    if not isinstance(windows.tokens, ShardedTokens):
        raise TypeError("a split needs windows read from a prepared folder (load_prepared_windows)")
    starts = document_starts(windows.tokens)
    chosen = held_out(np.arange(len(starts), dtype=np.int64), fraction)
    tokens = DocumentSubset(windows.tokens, chosen if validation else ~chosen, starts)
    seq_len = seq_len or windows.seq_len
    side = "validation" if validation else "training"
    if len(tokens) < seq_len + 1:
        where = windows.origin.folder if windows.origin is not None else "the training data"
        raise InputError(
            where,
            f"data.validation_fraction = {fraction} leaves the {side} side {tokens.num_documents} of {len(starts)} "
            f"documents, {len(tokens)} tokens: fewer than one window of seq_len + 1 = {seq_len + 1}",
            "raise data.validation_fraction" if validation else "lower data.validation_fraction, or add data",
        )
    fingerprint = hashlib.sha256(f"{windows.fingerprint}/split-{SPLIT_VERSION}:{fraction!r}:{side}".encode())
    return replace(windows, tokens=tokens, seq_len=seq_len, fingerprint=fingerprint.hexdigest())
