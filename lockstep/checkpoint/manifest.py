"""The checkpoint manifest (``lockstep.json``) and the one check of its shape, shared by the folder helpers
and the safe reader: every file name it records must name a plain file in the step folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

MANIFEST = "lockstep.json"
_DIGEST = re.compile(r"^[0-9a-f]{32}$")


def plain_file_name(name: object) -> bool:
    """A name that can only mean a file directly in its folder: no separator, not '.' or '..', no NUL,
    not absolute. Every file name a checkpoint records must be one, so no crafted manifest can make a
    load open anything outside the step folder (``/dev/zero``, ``../../etc/hostname``)."""
    return (
        isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        and "\0" not in name
    )  # fmt: skip


def read_manifest(folder: Path) -> dict:
    """The manifest, its shape checked: ValueError naming the key for one that is not lockstep's
    (damaged or crafted). ``files`` maps plain file names to byte counts, ``checksums`` plain names of
    listed files to xxh3-128 hex digests."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a JSON object")
    files, digests = manifest.get("files", {}), manifest.get("checksums", {})
    if not isinstance(files, dict) or not all(
        plain_file_name(k) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in files.items()
    ):
        raise ValueError(f"{path}: 'files' must map file names in the folder to byte counts")
    if not isinstance(digests, dict) or not all(
        k in files and isinstance(v, str) and _DIGEST.match(v) for k, v in digests.items()
    ):
        raise ValueError(f"{path}: 'checksums' must map files listed under 'files' to xxh3-128 digests")
    return manifest
