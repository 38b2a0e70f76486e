"""Where documents come from: the built-in corpus, or a user's text, json/jsonl or parquet files.

Each source yields documents (strings) in a fixed order and has a fingerprint (content sha256) so
a tokenized cache, and later a resumed run, can tell whether the data changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lockstep.config.errors import ConfigError
from lockstep.errors import InputError

_EXTENSIONS = {"text": (".txt",), "json": (".json", ".jsonl"), "parquet": (".parquet",)}


@dataclass(frozen=True)
class DocumentSource:
    kind: str
    """text, json, parquet, or builtin (the built-in corpus's own jsonl)."""
    files: tuple[Path, ...]
    text_field: str = "text"

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.kind}/{self.text_field}".encode())
        for file in self.files:
            digest.update(file.name.encode())
            try:
                with open(file, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
            except OSError as e:
                raise InputError(file, f"cannot read it ({e.strerror})", "check its permissions") from e
        return digest.hexdigest()

    @property
    def location(self) -> str:
        """The file, or the folder holding the files, for messages about the whole source."""
        if len(self.files) == 1:
            return str(self.files[0])
        return os.path.commonpath([str(f) for f in self.files])

    def documents(self) -> Iterator[str]:
        """Documents in file order, read here (not through `datasets`) so that every malformed input
        raises InputError naming the file and the line or record; the token file being written is then
        removed (lockstep.data.cache.atomic_path), so no cache entry is left half-written."""
        for file in self.files:
            if self.kind == "text":  # one file, one document
                # Newlines as text mode reads them (as before), so cached token files stay valid.
                yield decode_text(file.read_bytes(), file).replace("\r\n", "\n").replace("\r", "\n")
            elif self.kind == "parquet":
                yield from parquet_texts(file, self.text_field)
            else:  # builtin (the corpus's own jsonl) and json
                yield from json_texts(file, self.text_field)


def decode_text(raw: bytes, file: Path, line: int = 0) -> str:
    """UTF-8 text, or InputError at the line (counted here when `line` is 0) of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = line or raw[: e.start].count(b"\n") + 1
        raise InputError(
            file,
            f"is not UTF-8 (byte 0x{raw[e.start]:02x})",
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8",
            where=f"line {where}",
        ) from e


def text_of(record: object, text_field: str, file: Path, where: str) -> str:
    if not isinstance(record, dict):
        raise InputError(file, f"a record must be a JSON object; got {type(record).__name__}", where=where)
    if text_field not in record:
        raise InputError(
            file,
            f"record has no field {text_field!r}; its fields: {', '.join(sorted(record)) or 'none'}",
            "set data.text_field to the field that holds the text",
            where=where,
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise InputError(
            file,
            f"field {text_field!r} is {type(text).__name__}, not a string",
            "fix or drop that record (every record's text must be a string)",
            where=where,
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a "\ud800" escape decodes to a lone surrogate that no tokenizer takes
        raise InputError(
            file, f"field {text_field!r} holds a lone surrogate (\\u{ord(text[e.start]):04x}), not text",
            "fix or drop that record", where=where,
        ) from None  # fmt: skip
    return text


TOO_DEEP = "the record nests deeper than a JSON reader can follow (a text record needs a few levels)"


def json_texts(file: Path, text_field: str) -> Iterator[str]:
    """A .json array of records, or JSON Lines (one record per line; .jsonl, or .json that is not one
    document). Read here rather than through `datasets` so an error can name the line."""
    if file.suffix == ".json":
        raw = file.read_bytes()
        try:
            records = json.loads(decode_text(raw, file))
        except InputError:  # not UTF-8: decode_text's own line, not "invalid JSON"
            raise
        except RecursionError:
            raise InputError(file, TOO_DEEP, "fix the JSON there") from None
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": a second document follows, so it is JSON Lines
                raise InputError(
                    file, f"invalid JSON: {e.msg}", "fix the JSON there", where=f"{e.lineno}:{e.colno}"
                ) from e
        except ValueError as e:  # an integer of more digits than Python converts
            raise InputError(file, f"invalid JSON: {e}", "fix the JSON there") from None
        else:
            if isinstance(records, dict):  # JSON Lines of one line
                records = [records]
            if not isinstance(records, list):
                raise InputError(file, "a .json dataset must be an array of records or JSON Lines")
            for index, record in enumerate(records):
                yield text_of(record, text_field, file, f"record {index}")
            return
    with open(file, "rb") as f:
        for number, raw_line in enumerate(f, start=1):
            if not raw_line.strip():
                continue
            where = f"line {number}"
            try:
                record = json.loads(decode_text(raw_line, file, number))
            except InputError:  # not UTF-8: decode_text's own line, not "invalid JSON"
                raise
            except RecursionError:
                raise InputError(file, TOO_DEEP, "fix or drop that line", where=where) from None
            except json.JSONDecodeError as e:
                raise InputError(
                    file, f"invalid JSON: {e.msg} (column {e.colno})", "fix or drop that line", where=where
                ) from e
            except ValueError as e:  # an integer of more digits than Python converts
                raise InputError(file, f"invalid JSON: {str(e)[:100]}", "fix or drop that line", where=where) from None
            yield text_of(record, text_field, file, where)


def parquet_texts(file: Path, text_field: str) -> Iterator[str]:
    """The text column of a parquet file, read in row batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise InputError(file, f"not a readable parquet file ({e})", "replace it, or remove it from the folder") from e
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise InputError(
            file,
            f"has no column {text_field!r}; its columns: {', '.join(schema.names)}",
            "set data.text_field to the column that holds the text",
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InputError(file, f"column {text_field!r} is {column_type}, not a string column")
    row = 0
    try:
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise InputError(file, f"column {text_field!r} is null", "fix or drop that row", where=f"row {row}")
                yield text
                row += 1
    except pa.ArrowException as e:
        raise InputError(file, f"cannot read the parquet data ({e})", where=f"row {row}") from e


def file_source(kind: str, path: str, text_field: str, key: str = "training.dataset_path") -> DocumentSource:
    """A file, or every matching file in a folder (sorted), of the given dataset kind; errors name `key`."""
    root = Path(path)
    if root.is_dir():
        files = tuple(sorted(p for p in root.rglob("*") if p.suffix in _EXTENSIONS[kind]))
    elif root.is_file():
        files = (root,)
    else:
        raise ConfigError(key, f"no such file or folder: {path}")
    if not files:
        raise ConfigError(key, f"no {'/'.join(_EXTENSIONS[kind])} files under {path}")
    return DocumentSource(kind, files, text_field)
