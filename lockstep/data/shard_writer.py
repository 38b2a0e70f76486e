"""Tokenize one shard into its token file, document index and record; run in a worker process or inline.

The token file and the index are written under temporary names and renamed into place; the record
(``NNNNN.json``, with the counts and the xxh3-128 checksums computed as the bytes went out) is written
last, so a shard without a record is simply not done, whatever a killed writer left. Content is
deterministic: two writers of one shard write the same bytes, so a duplicated job is harmless.

Input is read here, not through `datasets` (except for kind hf), with the rules and one-line errors of
lockstep.data.sources. The input bytes are hashed as they are read: the source fingerprint is built from
these digests, so preparing never needs a second pass over the data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import xxhash

from lockstep.data.cache import atomic_path
from lockstep.data.prepared import TOKENIZER_FILE, shard_path
from lockstep.data.shard_plan import ShardTask, load_hf_dataset
from lockstep.data.sources import TOO_DEEP, decode_text, json_texts, parquet_texts, text_of
from lockstep.data.tokenizer import BytesTokenizer, HFTokenizer, Tokenizer
from lockstep.errors import InputError, LockstepError
from lockstep.lifetime import die_with_parent

_CHUNK_CHARS = 1 << 20
_CHUNK_DOCUMENTS = 1024
"""Documents go to the tokenizer about 1 MB at a time: large enough for its threads, small enough for the bar."""

Progress = Callable[[int], None]
"""Called with the input bytes just consumed."""


def _file_bytes(path: Path, hasher: xxhash.xxh3_128) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            hasher.update(chunk)


def _line_number(path: Path, offset: int, line_in_range: int) -> int:
    """The line number of a line of a byte range (counted only for an error message)."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + line_in_range


def _jsonl_range(task: ShardTask, hasher: xxhash.xxh3_128) -> Iterator[tuple[str, int]]:
    path = Path(task.path)
    with open(path, "rb") as f:
        f.seek(task.start)
        data = f.read(task.end - task.start)
    hasher.update(data)
    consumed = 0
    for number, raw_line in enumerate(data.split(b"\n"), start=1):
        consumed += len(raw_line) + 1
        if not raw_line.strip():
            continue
        try:
            try:
                record = json.loads(raw_line.decode("utf-8"))
            except UnicodeDecodeError:
                record = json.loads(decode_text(raw_line, path, 1))  # raises with the byte
            yield text_of(record, task.text_field, path, ""), consumed
        except json.JSONDecodeError as e:
            where = f"line {_line_number(path, task.start, number)}"
            raise InputError(
                path, f"invalid JSON: {e.msg} (column {e.colno})", "fix or drop that line", where=where
            ) from e
        except RecursionError:
            where = f"line {_line_number(path, task.start, number)}"
            raise InputError(path, TOO_DEEP, "fix or drop that line", where=where) from None
        except InputError as e:
            raise InputError(e.path, e.problem, e.fix, where=f"line {_line_number(path, task.start, number)}") from e
        except ValueError as e:  # an integer of more digits than Python converts
            where = f"line {_line_number(path, task.start, number)}"
            raise InputError(path, f"invalid JSON: {str(e)[:100]}", "fix or drop that line", where=where) from None
        consumed = 0


def _whole_file(task: ShardTask, hasher: xxhash.xxh3_128) -> Iterator[tuple[str, int]]:
    path = Path(task.path)
    if task.kind == "text":  # one file, one document; newlines as text mode reads them
        raw = path.read_bytes()
        hasher.update(raw)
        yield decode_text(raw, path).replace("\r\n", "\n").replace("\r", "\n"), len(raw)
        return
    _file_bytes(path, hasher)
    texts = parquet_texts(path, task.text_field) if task.kind == "parquet" else json_texts(path, task.text_field)
    size, seen = task.end - task.start, 0
    for text in texts:  # progress by text length; what the file holds beyond its texts, at its end
        step = min(len(text), size - seen)
        seen += step
        yield text, step
    yield None, size - seen


def _hf_rows(task: ShardTask, hasher: xxhash.xxh3_128) -> Iterator[tuple[str, int]]:
    dataset = load_hf_dataset(task.path, task.split, task.text_field)
    rows = dataset.select_columns([task.text_field]).select(range(task.start, task.end))
    count, row = max(1, task.end - task.start), 0
    for batch in rows.iter(batch_size=1024):
        for text in batch[task.text_field]:
            if not isinstance(text, str):
                where = f"row {task.start + row}"
                raise InputError(
                    task.path, f"column {task.text_field!r} is not a string there", "fix or drop it", where=where
                )
            hasher.update(text.encode("utf-8"))
            hasher.update(b"\0")
            row += 1  # progress: the row's share of the estimated bytes
            yield text, task.input_bytes * row // count - task.input_bytes * (row - 1) // count


def documents(task: ShardTask, hasher: xxhash.xxh3_128) -> Iterator[tuple[str | None, int]]:
    """(document, input bytes consumed with it) of a shard, hashing the input as it is read; a None
    document only reports bytes."""
    if task.kind == "jsonl":
        return _jsonl_range(task, hasher)
    if task.kind == "hf":
        return _hf_rows(task, hasher)
    return _whole_file(task, hasher)


def _encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """BOS + ids + EOS of each text, flat, and each document's length."""
    if isinstance(tokenizer, BytesTokenizer):
        encoded = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
    else:
        encoded = [np.asarray(ids, dtype) for ids in tokenizer.encode_batch(texts)]
    lengths = np.fromiter((len(ids) + 2 for ids in encoded), np.int64, len(encoded))
    flat = np.empty(int(lengths.sum()), dtype)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    flat[starts] = tokenizer.bos_id
    flat[ends - 1] = tokenizer.eos_id
    inner = np.ones(len(flat), bool)
    inner[starts] = False
    inner[ends - 1] = False
    flat[inner] = np.concatenate(encoded) if encoded else []
    return flat, lengths


def write_shard(folder: Path, task: ShardTask, tokenizer: Tokenizer, dtype: np.dtype, progress: Progress) -> dict:
    """Tokenize the shard into folder/shards and return its record (also written as NNNNN.json)."""
    input_hash, tokens_hash, docs_hash = xxhash.xxh3_128(), xxhash.xxh3_128(), xxhash.xxh3_128()
    num_tokens, starts = 0, []
    tokens_file, docs_file = shard_path(folder, task.name, "tokens"), shard_path(folder, task.name, "docs")
    with atomic_path(tokens_file) as tmp, open(tmp, "wb") as out:
        chunk: list[str] = []
        chars, pending = 0, 0

        def flush() -> None:
            nonlocal num_tokens, chars, pending
            if chunk:
                flat, lengths = _encode(tokenizer, chunk, dtype)
                starts.append(num_tokens + np.cumsum(lengths) - lengths)
                out.write(memoryview(flat))
                tokens_hash.update(memoryview(flat))
                num_tokens += len(flat)
            progress(pending)
            chunk.clear()
            chars = pending = 0

        for text, consumed in documents(task, input_hash):
            pending += consumed
            if text is not None:
                chunk.append(text)
                chars += len(text)
            if chars >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCUMENTS:
                flush()
        flush()
    index = np.concatenate(starts).astype(np.uint64) if starts else np.empty(0, np.uint64)
    with atomic_path(docs_file) as tmp:
        index.tofile(tmp)
    docs_hash.update(memoryview(index))
    record = {
        "name": task.name,
        "tokens": num_tokens,
        "documents": len(index),
        "tokens_xxh3": tokens_hash.hexdigest(),
        "docs_xxh3": docs_hash.hexdigest(),
        "input_bytes": task.input_bytes,
        "input_xxh3": input_hash.hexdigest(),
    }
    with atomic_path(shard_path(folder, task.name, "json")) as tmp:
        tmp.write_text(json.dumps(record, sort_keys=True))
    return record


# ---- in a worker process ----------------------------------------------------------------------------

_WORKER: dict = {}


def init_worker(threads: int, queue, folder: str, tokenizer_kind: str, dtype: str) -> None:
    """Set the tokenizer's thread count before it first runs (the `tokenizers` thread pool reads it once),
    and die with the preparing process, whatever kills it (no worker left writing under PID 1)."""
    die_with_parent()
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    tokenizer = BytesTokenizer() if tokenizer_kind == "bytes" else HFTokenizer(Path(folder) / TOKENIZER_FILE)
    _WORKER.update(queue=queue, folder=Path(folder), tokenizer=tokenizer, dtype=np.dtype(dtype))


def run_task(task: ShardTask) -> dict:
    """write_shard in a worker; a user error comes back as a plain LockstepError (InputError and
    ConfigError do not survive pickling with their own constructors)."""
    queue = _WORKER["queue"]
    try:
        return write_shard(_WORKER["folder"], task, _WORKER["tokenizer"], _WORKER["dtype"], queue.put)
    except LockstepError as e:
        raise LockstepError(str(e)) from None
