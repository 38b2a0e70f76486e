"""Crafted checkpoints: a pickle payload or flipped bytes that only the content checks can catch
(the metadata points at the payload and the manifest's sizes and checksums are made to match)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

from torch.distributed.checkpoint.filesystem import _StorageInfo

from lockstep.checkpoint import folders
from lockstep.checkpoint.checksums import file_digest
from lockstep.checkpoint.safe_reader import SafeFileSystemReader


class Payload:
    """Unpickling this creates `marker`: the side effect the tests assert never happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def refresh_manifest(folder: Path) -> None:
    """Make the manifest's sizes and checksums match the files as they are now."""
    manifest = folders.read_manifest(folder)
    manifest["files"] = {name: (folder / name).stat().st_size for name in manifest["files"]}
    manifest["checksums"] = {name: file_digest(folder / name) for name in manifest["checksums"]}
    (folder / folders.MANIFEST).write_text(json.dumps(manifest, indent=2))


def plant_payload(folder: Path, item: str, marker: Path) -> str:
    """Append a pickled payload to the data file of `item` and point the metadata at it; returns
    the data file's name."""
    metadata = SafeFileSystemReader(str(folder)).read_metadata()
    index = next(i for i in metadata.storage_data if i.fqn == item)
    data_file = folder / metadata.storage_data[index].relative_path
    payload = pickle.dumps(Payload(marker), protocol=2)  # (protocol 4 is refused too, less legibly)
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = _StorageInfo(data_file.name, offset, len(payload))
    metadata.storage_meta = None
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    refresh_manifest(folder)
    return data_file.name


def flip_byte(folder: Path, at: float = 0.5) -> str:
    """Flip one byte in the middle of the largest data file (same size); returns its name."""
    data_file = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(data_file.read_bytes())
    raw[int(len(raw) * at)] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    return data_file.name


def flip_tensor_byte(folder: Path, item: str, data_file: str | None = None) -> str:
    """Flip one byte in the middle of `item`'s stored bytes (its tensor data; same size, manifest as
    written), in `data_file` if it holds several chunks of it; returns the data file's name."""
    metadata = SafeFileSystemReader(str(folder)).read_metadata()
    stored = [info for index, info in metadata.storage_data.items() if index.fqn == item]
    info = next(i for i in stored if data_file in (None, i.relative_path))
    path = folder / info.relative_path
    raw = bytearray(path.read_bytes())
    raw[info.offset + info.length // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return info.relative_path
