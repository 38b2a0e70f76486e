"""Tokenize documents once into a flat token file, then serve fixed-size windows by index.

Layout (Megatron-style pre-tokenisation): every document becomes BOS + tokens + EOS, appended to
one uint16/uint32 array cached on disk and memory-mapped. Window w is tokens
[w*(S+1), (w+1)*(S+1)); inputs are its first S tokens, labels its last S. Any window can be read
in O(1), so the sample order can be any pure function of (seed, index) and resuming needs only
a sample index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lockstep.data.cache import atomic_path, cache_root
from lockstep.data.sources import DocumentSource
from lockstep.data.tokenizer import Tokenizer
from lockstep.errors import InputError

IGNORE_INDEX = -100
_ENCODE_CHUNK = 512


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def tokenize_to_file(source: DocumentSource, tokenizer: Tokenizer, target: Path) -> None:
    """Stream documents through the tokenizer into `target` (written under a temporary name)."""
    dtype = _dtype_for(tokenizer.vocab_size)
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        chunk: list[str] = []

        def flush() -> None:
            for ids in tokenizer.encode_batch(chunk):
                np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype).tofile(out)
            chunk.clear()

        for document in source.documents():
            chunk.append(document)
            if len(chunk) == _ENCODE_CHUNK:
                flush()
        flush()


@dataclass
class TokenWindows:
    """Fixed windows of seq_len + 1 tokens over a tokenized dataset."""

    tokens: np.ndarray
    seq_len: int
    bos_id: int
    eos_id: int
    fingerprint: str
    """Identifies (documents, tokenizer); recorded in env.json and in the loader state."""

    @property
    def num_windows(self) -> int:
        return len(self.tokens) // (self.seq_len + 1)

    def window(self, index: int) -> np.ndarray:
        start = index * (self.seq_len + 1)
        return self.tokens[start : start + self.seq_len + 1]

    def batch(self, window_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), int64 [n, seq_len]. A label that is a BOS (the start of the next
        document, which nothing before it can predict) is ignored."""
        windows = torch.from_numpy(np.stack([self.window(i) for i in window_indices]).astype(np.int64))
        inputs, labels = windows[:, :-1], windows[:, 1:].clone()
        labels[labels == self.bos_id] = IGNORE_INDEX
        return inputs, labels


def load_token_windows(
    source: DocumentSource | None,
    tokenizer: Tokenizer,
    seq_len: int,
    cache_folder: str,
    source_fingerprint: str | None = None,
) -> TokenWindows:
    """Tokenize (cached by source and tokenizer fingerprints) and view as windows of seq_len + 1."""
    fingerprint_in = source_fingerprint or source.fingerprint()
    fingerprint = hashlib.sha256(f"{fingerprint_in}/{tokenizer.fingerprint}".encode()).hexdigest()
    target = cache_root(cache_folder) / "tokens" / f"{fingerprint[:32]}.bin"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tokenize_to_file(source, tokenizer, target)
    dtype = _dtype_for(tokenizer.vocab_size)
    num_tokens = target.stat().st_size // dtype.itemsize
    if num_tokens < seq_len + 1:  # also keeps np.memmap away from an empty file, which it cannot map
        raise _too_small(source, num_tokens, seq_len)
    tokens = np.memmap(target, dtype=dtype, mode="r")
    return TokenWindows(tokens, seq_len, tokenizer.bos_id, tokenizer.eos_id, fingerprint)


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
