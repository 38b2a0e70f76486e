"""Where the samples of a run came from: for global sample indices, the source file, the document in it,
the token offset in that document, and a decoded preview (what ``lockstep inspect RUN --step N`` prints).

The answer is computed, not recorded: global sample g is window ``order.windows_of([g])`` (a pure function
of the seed and g), window w is the tokens [w*(S+1), (w+1)*(S+1)) of the stream, and a prepared folder says
where each of its tokens came from. Its shards are the input files cut in order (a shard is a whole file, a
byte range of a JSON Lines file or a row range of a Hugging Face dataset), each shard's ``.docs`` index
holds the start of every document in it, and the manifest gives each shard's file and document count. So
the window's first token is found by a binary search over the shard offsets, then one over that shard's
document index (memory-mapped: only the pages searched are read), and the document's number in its file
is the documents of the file's earlier shards (from the manifest) plus its number in the shard. Cost per
sample: O(log shards + log documents per shard) and ``preview_tokens`` tokens read; no shard is read
whole and no input file is opened, so it is as fast on hundreds of GB as on a test folder.

What the document number counts: the 0-based index of the document among the documents read from its
file, which is the record a user finds there except for one rule of the readers
(lockstep.data.sources, lockstep.data.shard_writer): JSON Lines skip blank (whitespace-only) lines. So:

* .jsonl (and a .json file that holds JSON Lines): the index among the file's non-blank lines; the line
  number (1-based) is document + 1 when the file has no blank lines, and is later by the blank lines
  before it otherwise. (Exact line numbers would need the input read up to the record: not done here.)
* .json array: the index of the record in the array.
* parquet: the row index; a Hugging Face dataset (kind hf): the row index of the split, and ``file`` is
  the dataset's name or folder as it was prepared.
* text: always 0 (a .txt file is one document).

A record whose text is empty is a document (BOS + EOS) and is counted.

The offset counts the document's BOS as token 0: the window's first token is token ``offset`` of
BOS + tokenizer ids + EOS of that document.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lockstep.data.dataset import TokenWindows
from lockstep.data.mixture import MixtureOrder, MixtureWindows
from lockstep.data.order import SampleOrder
from lockstep.data.prepared import PreparedOrigin, ShardedTokens
from lockstep.data.split import DocumentSubset
from lockstep.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class SampleSource:
    """Where one global sample of a run came from."""

    sample: int
    """The global sample index (the loader serves a step's global batch as consecutive indices)."""
    window: int
    """The window id that serves it (for a mixture, offsets[source] + the window within the source)."""
    source: str
    """The mixture source's name; else the prepared dataset's kind (json, text, parquet, hf, builtin);
    "" when the windows' origin is unknown."""
    file: str
    """The input file, absolute (for kind hf, the dataset's name or folder); "" when unknown."""
    document: int
    """0-based number of the document within that file (see the module docstring); -1 when unknown."""
    offset: int
    """Token offset of the window's first token within that document (its BOS is 0); -1 when unknown."""
    documents: int
    """How many documents the window's seq_len + 1 tokens touch (1 when it lies inside one document)."""
    preview: str
    """The window's first tokens, decoded."""


def sample_sources(
    windows: TokenWindows | MixtureWindows,
    order: SampleOrder | MixtureOrder,
    samples: range | list[int],
    tokenizer: Tokenizer,
    preview_tokens: int = 48,
) -> list[SampleSource]:
    """Where each of `samples` (global sample indices) came from, in the order given. `order` must be the
    run's (``DataLoader.order``: a SampleOrder over `windows`, or the mixture's MixtureOrder), since it
    decides which window a sample is. Windows not read from a prepared folder (no ``origin``) are
    reported with file "", document -1 and offset -1 instead of failing."""
    samples = list(samples)
    window_ids = order.windows_of(samples) if samples else []
    if isinstance(windows, MixtureWindows):
        sources, local = windows.split(window_ids)
        parts = [
            (windows.names[i], windows.sources[i], int(w))
            for i, w in zip(sources.tolist(), local.tolist(), strict=True)
        ]
    else:
        name = windows.origin.manifest["source"]["kind"] if windows.origin is not None else ""
        parts = [(name, windows, w) for w in window_ids]
    tracers: dict[int, _Tracer] = {}
    found = []
    for sample, window_id, (name, source, local_window) in zip(samples, window_ids, parts, strict=True):
        tracer = tracers.get(id(source))
        if tracer is None:
            tracer = tracers[id(source)] = _Tracer(source)
        file, document, offset, touched = tracer.locate(local_window)
        start = local_window * (source.seq_len + 1)
        ids = np.asarray(source.tokens[start : start + min(preview_tokens, source.seq_len + 1)]).tolist()
        preview = tokenizer.decode(ids) if ids else ""
        found.append(SampleSource(int(sample), int(window_id), name, file, document, offset, touched, preview))
    return found


class _Tracer:
    """Window -> (file, document in the file, offset in the document, documents touched) for one TokenWindows.
    Built once per call: it walks the manifest's shard list once (Python, O(shards)) to count each shard's
    documents before it in its file; files are resolved to paths on first use."""

    def __init__(self, windows: TokenWindows) -> None:
        self.windows = windows
        self.subset = windows.tokens if isinstance(windows.tokens, DocumentSubset) else None
        tokens = self.subset.base if self.subset is not None else windows.tokens
        self.sharded = tokens if isinstance(tokens, ShardedTokens) else None
        self.origin: PreparedOrigin | None = windows.origin if self.sharded is not None else None
        self.paths: dict[int, str] = {}
        if self.origin is not None:
            shards = self.origin.manifest["shards"]
            seen: dict[int, int] = {}
            self.file_of = [int(s["file"]) for s in shards]
            self.before = []
            for shard, file in zip(shards, self.file_of, strict=True):
                self.before.append(seen.get(file, 0))
                seen[file] = seen.get(file, 0) + int(shard["documents"])

    def locate(self, window: int) -> tuple[str, int, int, int]:
        span = self.windows.seq_len + 1
        start = window * span
        touched = 1 + self._starting_in(start + 1, start + span)
        if self.origin is None:
            return "", -1, -1, touched
        sharded = self.sharded
        assert sharded is not None
        if self.subset is not None:  # one side of a split: where its window starts in the prepared stream
            start = int(self.subset.to_base(np.asarray([start]))[0])
        # The last shard whose first token is at or before `start` (empty shards share their offset with the next).
        shard = int(np.searchsorted(sharded.offsets, start, side="right")) - 1
        starts = sharded._documents(shard)
        local = start - int(sharded.offsets[shard])
        in_shard = int(np.searchsorted(starts, local, side="right")) - 1  # a shard begins with a document: >= 0
        offset = local - int(starts[in_shard])
        file = self.file_of[shard]
        return self._path(file), self.before[shard] + in_shard, offset, touched

    def _starting_in(self, begin: int, end: int) -> int:
        """Documents starting in [begin, end): from the document index when there is one, else the BOS ids."""
        counter = getattr(self.windows.tokens, "documents_starting_in", None)
        if counter is not None:
            return counter(begin, end)
        return int(np.count_nonzero(np.asarray(self.windows.tokens[begin:end]) == self.windows.bos_id))

    def _path(self, file: int) -> str:
        path = self.paths.get(file)
        if path is None:
            assert self.origin is not None
            path = self.paths[file] = input_path(self.origin.manifest, file)
        return path


def input_path(manifest: dict, file: int) -> str:
    """The absolute path of input file `file` of a prepared folder (the dataset's name for kind hf).

    The manifest records ``location`` (the file, or a folder holding the files) and each file's name
    relative to the folder the files were found under: a lone file is ``location`` itself, several are
    ``location / name``. ``lockstep data prepare`` records the folder it was given, which is above that
    one when every file lies in one sub-folder; then the first ``location/**/name`` found is taken. A
    relative location (training on files given by a relative path) is resolved from the current folder.
    Nothing is checked beyond that: a file moved or changed since preparation is not detected here."""
    source = manifest["source"]
    name = source["files"][file]["name"]
    if source["kind"] == "hf":
        return name
    root = Path(manifest["location"]).expanduser().resolve()
    if root.is_file() or (len(source["files"]) == 1 and not root.is_dir()):
        return str(root)
    path = root / name
    if not path.exists() and root.is_dir():
        path = next(root.glob(f"**/{glob.escape(name)}"), path)
    return str(path)
