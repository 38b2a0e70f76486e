"""Ways to damage a file: JSON values of the wrong shape, raw text JSON cannot hold, cut files, links,
FIFOs, and safetensors headers that lie. Each edits a copy in a case's own folder."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEPTH = 100_000
DEEP_LIST = "[" * DEPTH + "]" * DEPTH
"""100,000-deep nesting: json.loads recurses once per level."""
DEEP_OBJECT = '{"a":' * DEPTH + "1" + "}" * DEPTH
LONE_SURROGATE = '"\\ud800"'
"""Valid JSON text whose string Python cannot encode to UTF-8 (nor to a file name)."""
NOT_UTF8 = b'{"files": "\xff\xfe\xfa"}'


class Raw(str):
    """JSON text put in place as is: ``set_key(doc, ("files",), Raw("NaN"))``."""


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def dumps(value: Any) -> str:
    """json.dumps, except that Raw values are spliced in as the text they hold."""
    spliced: dict[str, str] = {}

    def mark(v: Any) -> Any:
        if isinstance(v, Raw):
            key = f"@@raw{len(spliced)}@@"
            spliced[key] = str(v)
            return key
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    text = json.dumps(mark(value), indent=1)
    for key, raw in spliced.items():
        text = text.replace(json.dumps(key), raw)
    return text


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, value: Any) -> None:
    path.write_text(dumps(value))


def set_key(document: Any, keys: tuple, value: Any) -> Any:
    """`document` with the value at `keys` (a path of dict keys and list indices) replaced; the empty
    path replaces the whole document."""
    if not keys:
        return value
    holder = document
    for key in keys[:-1]:
        holder = holder[key]
    holder[keys[-1]] = value
    return document


def drop_key(document: Any, keys: tuple) -> Any:
    holder = document
    for key in keys[:-1]:
        holder = holder[key]
    del holder[keys[-1]]
    return document


def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    """Rewrite the JSON file at `path` with `edit(document)` (Raw values allowed)."""
    write_json(path, edit(read_json(path)))


def setter(keys: tuple, value: Any) -> Callable[[Path], None]:
    return lambda path: edit_json(path, lambda d: set_key(d, keys, value))


def dropper(keys: tuple) -> Callable[[Path], None]:
    return lambda path: edit_json(path, lambda d: drop_key(d, keys))


def text(content: str | bytes) -> Callable[[Path], None]:
    """Replace the file's whole content."""
    data = content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content
    return lambda path: path.write_bytes(data)


def truncate(keep: float) -> Callable[[Path], None]:
    """Keep the first `keep` fraction of the file's bytes."""

    def cut(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return cut


def flip(at: float = 0.5) -> Callable[[Path], None]:
    """Flip one byte (same size)."""

    def flipped(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[int(len(data) * at)] ^= 0xFF
        path.write_bytes(bytes(data))

    return flipped


def append(extra: bytes) -> Callable[[Path], None]:
    def grow(path: Path) -> None:
        with open(path, "ab") as f:
            f.write(extra)

    return grow


def fifo(path: Path) -> None:
    """A named pipe in the file's place: opening it for reading blocks until a writer comes."""
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def link_to(target: Path | str) -> Callable[[Path], None]:
    def link(path: Path) -> None:
        path.unlink(missing_ok=True)
        path.symlink_to(target)

    return link


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def folder_instead(path: Path) -> None:
    remove(path)
    path.mkdir()


# --- safetensors ---------------------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(path: Path, header: dict | bytes, data: bytes, *, claimed_length: int | None = None) -> None:
    """A safetensors file from a header (a dict, or raw bytes) and the data bytes; `claimed_length`
    makes the 8-byte length prefix lie."""
    body = header if isinstance(header, bytes) else dumps(header).encode("utf-8", "surrogatepass")
    prefix = struct.pack("<Q", len(body) if claimed_length is None else claimed_length)
    path.write_bytes(prefix + body + data)


def edit_safetensors(edit: Callable[[dict, bytes], tuple[dict | bytes, bytes]]) -> Callable[[Path], None]:
    """Rewrite a safetensors file with `edit(header, data) -> (header, data)`."""

    def rewrite(path: Path) -> None:
        header, data = read_safetensors(path)
        write_safetensors(path, *edit(header, data))

    return rewrite


def first_tensor(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def tensor_setter(key: str, value: Any) -> Callable[[Path], None]:
    """Set one field (dtype, shape, data_offsets) of the first tensor in the header."""

    def edit(header: dict, data: bytes) -> tuple[dict, bytes]:
        header[first_tensor(header)][key] = value
        return header, data

    return edit_safetensors(edit)
