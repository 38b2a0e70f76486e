"""A prepared dataset folder: the format, and reading it back as memory-mapped token windows.

Layout of FOLDER (written by lockstep.data.prepare)::

    manifest.json          written last, once every shard is present: the folder is usable iff it exists
    plan.json              the inputs, the tokenizer and the shard boundaries (written first)
    tokenizer.json         the tokenizer the tokens were made with (+ tokenizer_config.json when it had one),
    tokenizer.bytes        or this marker for the bytes tokenizer
    shards/NNNNN.tokens    uint16/uint32 tokens: every document as BOS + ids + EOS, in input order
    shards/NNNNN.docs      uint64 start offset of each document within the shard (the document index)
    shards/NNNNN.json      the shard's record (counts, checksums); its presence marks the shard done

The shards concatenated in order are exactly the token stream the one-file cache used to hold, so the
windows (seq_len + 1 tokens each, over the whole stream) are the same. Start-up reads the manifest and
checks every shard's size, but never re-hashes content (``lockstep data verify`` does that on demand):
at a trillion tokens a start must not read the data.
"""

from __future__ import annotations

import hashlib
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lockstep.errors import InputError
from lockstep.untrusted import Int, ListOf, MapOf, Obj, Shape, Str, check_shape
from lockstep.untrusted import read_json as read_checked_json

FORMAT = "lockstep-prepared"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
SHARDS = "shards"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
BYTES_MARKER = "tokenizer.bytes"
CHECKSUM = "xxh3_128"
_OPEN_SHARDS = 256
"""Memory maps kept open at once (each holds a file descriptor); older ones are closed and reopened on use."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (as the one-file cache stored them)."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def dataset_fingerprint(source_fingerprint: str, tokenizer_fingerprint: str) -> str:
    """What a run records and checks on resume: the documents and the tokenizer (the formula the
    one-file cache used, so runs on the built-in corpus keep their fingerprint)."""
    return hashlib.sha256(f"{source_fingerprint}/{tokenizer_fingerprint}".encode()).hexdigest()


def shard_path(folder: Path, name: str, suffix: str) -> Path:
    return folder / SHARDS / f"{name}.{suffix}"


PREPARE_AGAIN = "prepare the folder again (lockstep data prepare)"
_ANY_OBJECT = MapOf()
_HEX32 = Str(pattern=r"[0-9a-f]{32}")
_COUNT = Int(min=0, max=2**50)
"""Tokens, documents, bytes: far above any real shard or corpus, below what an int64 offset holds."""
PLAN_SHARD = Obj(
    required={"name": Str(pattern=r"[0-9]{1,12}"), "kind": Str(), "file": _COUNT, "start": _COUNT, "end": _COUNT}
)
SHARD_RECORD = Obj(required={"documents": _COUNT, "tokens": _COUNT, "tokens_xxh3": _HEX32, "docs_xxh3": _HEX32})
"""shards/NNNNN.json, written by the worker that finished the shard."""
PLAN_SHAPE = Obj(
    required={
        "format": Str(choices=(FORMAT,)),
        "version": Int(),
        "dtype": Str(choices=("uint16", "uint32")),
        "tokenizer": Obj(
            required={"kind": Str(choices=("bytes", "hf")), "fingerprint": Str(), "vocab_size": Int(min=1, max=2**32)},
            optional={"name": Str(), "bos_id": _COUNT, "eos_id": _COUNT},
        ),
        "source": Obj(
            required={"kind": Str(), "files": ListOf(Obj())},
            optional={"text_field": Str(), "split": Str(), "fingerprint": Str()},
        ),
        "shards": ListOf(PLAN_SHARD),
    },
    optional={"location": Str()},
)
"""plan.json: what ``lockstep data prepare`` writes before any shard (and checks a rerun against)."""
MANIFEST_SHAPE = Obj(
    required={
        **PLAN_SHAPE.required,
        "num_tokens": _COUNT,
        "num_documents": _COUNT,
        "fingerprint": Str(),
        "shards": ListOf(Obj(required={**PLAN_SHARD.required, **SHARD_RECORD.required})),
    },
    optional={**PLAN_SHAPE.optional, "checksum": Str()},
)
"""manifest.json: the plan and every shard's record, written by finalize."""


def read_json(path: Path, shape: Shape = _ANY_OBJECT) -> dict:
    """A JSON object written by preparation, of `shape`; InputError (naming the file and key) otherwise."""
    return read_checked_json(path, shape, fix=PREPARE_AGAIN)


def read_manifest(folder: Path) -> dict:
    """The manifest of a finished preparation; InputError naming what is missing otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "no such prepared dataset folder", "prepare one: lockstep data prepare --out FOLDER")
    path = folder / MANIFEST
    if not path.is_file():
        fix = "run lockstep data finalize on it once every job is done"
        if not (folder / PLAN).is_file():
            fix = "prepare it first: lockstep data prepare ... --out FOLDER"
        raise InputError(folder, "has no manifest.json (not a finished preparation)", fix)
    manifest = read_json(path)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise InputError(
            path,
            f"is format {manifest.get('format')!r} version {manifest.get('version')!r}; this lockstep reads "
            f"{FORMAT!r} version {VERSION}",
            "prepare the data again with this lockstep",
        )
    return check_shape(path, manifest, MANIFEST_SHAPE, fix=PREPARE_AGAIN)  # a shard name is never a path


def tokenizer_fix(folder: Path, manifest: dict) -> str:
    """The overrides that train with the folder's own tokenizer."""
    if manifest["tokenizer"]["kind"] == "bytes":
        return "train with --model.tokenizer bytes"
    return f"train with the folder's own tokenizer: --model.tokenizer hf --model.tokenizer_path {folder}"


@dataclass(eq=False)
class PreparedOrigin:
    """Where windows read by load_prepared_windows come from: the folder and its manifest (already read
    at start-up, so tracing a sample to its source file costs no further read of it)."""

    folder: Path
    manifest: dict = field(repr=False)


class ShardedTokens:
    """The shards' tokens as one read-only sequence: ``len``, an int, a slice or an int array of positions,
    as a numpy array would answer (what TokenWindows asks of its tokens). A window that crosses a shard
    boundary is stitched from both.

    Nothing is opened until a sample is read: a rank of a 512-rank job touches only the shards its own
    samples lie in (the manifest, read once, gives every shard's token count). A shard is checked against
    the manifest's size when it is first mapped, and at most ``_OPEN_SHARDS`` stay mapped (least
    recently used first out), so a corpus of 10^5 shards never holds 10^5 maps."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype) -> None:
        self.paths = paths
        self.counts = counts
        self.dtype = dtype
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._document_maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def _documents(self, index: int) -> np.ndarray:
        """Shard `index`'s document index (start offsets within the shard, sorted), memory-mapped."""
        starts = self._document_maps.get(index)
        if starts is None:
            path = self.paths[index].with_suffix(".docs")
            size = _size(path)
            if size < 0 or size % 8:
                found = "it is missing" if size < 0 else f"it has {size} bytes, not a multiple of 8"
                raise InputError(
                    path, f"is not a document index ({found})", "prepare the folder again, or run lockstep data verify"
                )  # fmt: skip
            starts = np.memmap(path, dtype=np.uint64, mode="r") if size else np.empty(0, np.uint64)
            self._document_maps[index] = starts
            if len(self._document_maps) > _OPEN_SHARDS:
                self._document_maps.popitem(last=False)
        else:
            self._document_maps.move_to_end(index)
        return starts

    def documents_starting_in(self, start: int, stop: int) -> int:
        """How many documents start at a position in [start, stop), from the document index alone (a
        binary search per shard the range touches: no token is read)."""
        count = 0
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop and first < len(self.paths):
            base, end = int(self.offsets[first]), min(stop, int(self.offsets[first + 1]))
            starts = self._documents(first)
            count += int(np.searchsorted(starts, end - base) - np.searchsorted(starts, start - base))
            start, first = end, first + 1
        return count

    def shard_of(self, position: int) -> Path:
        """The shard file that holds global token `position`."""
        return self.paths[int(np.searchsorted(self.offsets, position, side="right")) - 1]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, index: int) -> np.ndarray:
        tokens = self._maps.get(index)
        if tokens is None:
            path, expected = self.paths[index], self.counts[index] * self.dtype.itemsize
            if (size := _size(path)) != expected:
                found = "it is missing" if size < 0 else f"it has {size} bytes"
                raise InputError(
                    path, f"the manifest records {expected} bytes but {found}",
                    "prepare the folder again, or run lockstep data verify on it",
                )  # fmt: skip
            tokens = np.memmap(path, dtype=self.dtype, mode="r") if expected else np.empty(0, self.dtype)
            self._maps[index] = tokens
            if len(self._maps) > _OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(index)
        return tokens

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            end = min(stop, int(self.offsets[first + 1]))
            base = int(self.offsets[first])
            parts.append(self._shard(first)[start - base : end - base])
            start, first = end, first + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self._range(start, stop)[::step] if stop > start else np.empty(0, self.dtype)
            return self._range(start, max(start, stop))
        if isinstance(key, (int, np.integer)):
            position = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"token {key} of {len(self)}")
            return self._range(position, position + 1)[0]
        positions = np.asarray(key, dtype=np.int64)
        shards = np.searchsorted(self.offsets, positions, side="right") - 1
        out = np.empty(positions.shape, self.dtype)
        for shard in np.unique(shards):
            where = shards == shard
            out[where] = self._shard(int(shard))[positions[where] - self.offsets[shard]]
        return out


def _size(path: Path) -> int:
    """The size in bytes of a shard file, or -1 when it is missing (one lstat). A link or anything but a
    plain file is refused: a shard is read only from inside its prepared folder."""
    try:
        status = path.lstat()
    except FileNotFoundError:
        return -1
    if not stat.S_ISREG(status.st_mode):
        raise InputError(path, "is not a plain file (a link, a folder or a device)", "prepare the folder again")
    return status.st_size


def done_record(out: Path, name: str, dtype: np.dtype) -> dict | None:
    """A shard's record when the shard is complete (record present, files of the recorded sizes)."""
    record_file = shard_path(out, name, "json")
    if not record_file.is_file():
        return None
    try:
        record = read_json(record_file, SHARD_RECORD)
        tokens, docs = shard_path(out, name, "tokens"), shard_path(out, name, "docs")
        complete = tokens.stat().st_size == record["tokens"] * dtype.itemsize
        complete = complete and docs.stat().st_size == record["documents"] * 8
    except (InputError, OSError, KeyError, TypeError):
        return None
    return record if complete else None
