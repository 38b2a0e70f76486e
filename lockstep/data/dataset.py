"""Tokenize documents once into token files, then serve fixed-size windows by index.

Layout (Megatron-style pre-tokenisation): every document becomes BOS + tokens + EOS, appended to
a uint16/uint32 token stream kept on disk in shards and memory-mapped (lockstep.data.prepared).
Window w is tokens [w*(S+1), (w+1)*(S+1)); inputs are its first S tokens, labels its last S. Any
window can be read in O(1), so the sample order can be any pure function of (seed, index) and
resuming needs only a sample index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lockstep.data.auto_prepare import prepare_cached
from lockstep.data.prepared import PreparedOrigin, ShardedTokens, read_manifest, shard_path, tokenizer_fix
from lockstep.data.sources import DocumentSource
from lockstep.data.tokenizer import Tokenizer
from lockstep.errors import InputError

IGNORE_INDEX = -100


@dataclass
class TokenWindows:
    """Fixed windows of seq_len + 1 tokens over a tokenized dataset."""

    tokens: np.ndarray
    seq_len: int
    bos_id: int
    eos_id: int
    fingerprint: str
    """Identifies (documents, tokenizer); recorded in env.json and in the loader state."""
    origin: PreparedOrigin | None = field(default=None, repr=False, compare=False)
    """The prepared folder the tokens were read from (set by load_prepared_windows; None for tokens made
    elsewhere), so a sample can be traced back to its file and document (lockstep.data.provenance)."""
    vocab_size: int | None = field(default=None, compare=False)
    """Token ids must be below it (checked per batch: a tampered or damaged shard is refused in one line,
    not an IndexError in the embedding); None leaves them unchecked."""

    @property
    def num_windows(self) -> int:
        return len(self.tokens) // (self.seq_len + 1)

    def window(self, index: int) -> np.ndarray:
        start = index * (self.seq_len + 1)
        return self.tokens[start : start + self.seq_len + 1]

    def valid_tokens(self, window_indices: list[int]) -> int:
        """How many labels of these windows take a loss: all but those that are a BOS (see ``batch``),
        i.e. the documents starting at label positions, counted from the document index when the
        tokens have one (prepared shards), else from the token ids. No tensors are built, and with
        the index no token of a window this rank does not train on is read."""
        span = self.seq_len + 1
        counter = getattr(self.tokens, "documents_starting_in", None)
        if counter is not None:
            return sum(self.seq_len - counter(w * span + 1, (w + 1) * span) for w in window_indices)
        starts = np.asarray(window_indices, dtype=np.int64) * span
        labels = self.tokens[(starts[:, None] + np.arange(1, span)).reshape(-1)]
        return int(labels.size - np.count_nonzero(labels == self.bos_id))

    def _refuse_out_of_vocabulary(self, window_indices: list[int], stacked: np.ndarray) -> None:
        row = int(np.argmax(stacked.max(axis=1)))
        position = window_indices[row] * (self.seq_len + 1) + int(np.argmax(stacked[row]))
        token = int(stacked.max())
        where = self.origin.folder if self.origin is not None else "the training data"
        shard_of = getattr(self.tokens, "shard_of", None)
        if shard_of is not None:
            where = shard_of(position)
        raise InputError(
            where, f"holds token id {token} at position {position}, at or above the vocabulary size "
            f"{self.vocab_size} (damaged or altered after preparing)", "run lockstep data verify on the folder",
        )  # fmt: skip

    def batch(self, window_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), int64 [n, seq_len]. A label that is a BOS (the start of the next
        document, which nothing before it can predict) is ignored."""
        stacked = np.stack([self.window(i) for i in window_indices])
        if self.vocab_size is not None and stacked.size and int(stacked.max()) >= self.vocab_size:
            self._refuse_out_of_vocabulary(window_indices, stacked)
        windows = torch.from_numpy(stacked.astype(np.int64))
        inputs, labels = windows[:, :-1], windows[:, 1:].clone()
        labels[labels == self.bos_id] = IGNORE_INDEX
        return inputs, labels


def load_token_windows(
    source: DocumentSource,
    tokenizer: Tokenizer,
    seq_len: int,
    cache_folder: str,
    source_fingerprint: str | None = None,
    nodes: int = 1,
) -> TokenWindows:
    """Prepare `source` into the cache once per machine (lockstep.data.auto_prepare: the machinery of
    ``lockstep data prepare``) and view it as windows of seq_len + 1. The fingerprint is the documents'
    (`source_fingerprint` when given, else the content digests taken while preparing) with the
    tokenizer's; a start once the cache exists reads no data, only file sizes and times."""
    folder, _ = prepare_cached(source, tokenizer, cache_folder, source_fingerprint, nodes=nodes)
    manifest = read_manifest(folder)
    if manifest["num_tokens"] < seq_len + 1:
        raise _too_small(source, manifest["num_tokens"], seq_len)
    return load_prepared_windows(folder, tokenizer, seq_len, manifest)


def _too_small(source: DocumentSource | None, num_tokens: int, seq_len: int) -> InputError:
    """Say how far the data falls short and what seq_len would fit (a window is seq_len + 1 tokens)."""
    location = source.location if source is not None else "the dataset"
    if num_tokens == 0:
        return InputError(location, "holds no documents", "point training.dataset_path at non-empty data")
    fits = f"training.seq_len <= {num_tokens - 1} would fit, " if num_tokens >= 2 else ""
    return InputError(
        location,
        f"has {num_tokens} tokens (BOS and EOS included), fewer than one window of seq_len + 1 = {seq_len + 1}",
        f"{fits}or add data",
    )


def load_prepared_windows(
    folder: Path,
    tokenizer: Tokenizer,
    seq_len: int,
    manifest: dict | None = None,
) -> TokenWindows:
    """Windows of seq_len + 1 tokens over a prepared folder. Refuses (one line) a tokenizer other than the
    folder's; opens no shard (a shard whose size is not the manifest's is refused when first read)."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    recorded = manifest["tokenizer"]
    if recorded["fingerprint"] != tokenizer.fingerprint:
        raise InputError(
            folder,
            f"was prepared with another tokenizer (fingerprint {recorded['fingerprint'][:12]}, this run's is "
            f"{tokenizer.fingerprint[:12]})",
            tokenizer_fix(folder, manifest),
        )
    dtype = np.dtype(manifest["dtype"])
    paths = [shard_path(folder, shard["name"], "tokens") for shard in manifest["shards"]]
    tokens = ShardedTokens(paths, [shard["tokens"] for shard in manifest["shards"]], dtype)  # opens nothing yet
    if len(tokens) < seq_len + 1:
        fits = f"training.seq_len <= {len(tokens) - 1} would fit, " if len(tokens) >= 2 else ""
        raise InputError(
            folder,
            f"has {len(tokens)} tokens (BOS and EOS included), fewer than one window of seq_len + 1 = {seq_len + 1}",
            f"{fits}or add data",
        )
    origin = PreparedOrigin(folder, manifest)
    return TokenWindows(
        tokens, seq_len, tokenizer.bos_id, tokenizer.eos_id, manifest["fingerprint"], origin,
        vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
