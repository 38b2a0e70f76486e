"""Finish a prepared folder (write its manifest) and check it (re-hash every shard against it).

The manifest is written once, from the shard records, only when every shard of the plan has one whose
files have the recorded sizes; so a folder with a manifest is complete, and its checksums are those
computed as the shards were written. Finalizing twice writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

from lockstep.data.cache import atomic_path
from lockstep.data.prepared import (
    CHECKSUM,
    MANIFEST,
    PLAN,
    PLAN_SHAPE,
    SHARDS,
    TOKENIZER_FILE,
    dataset_fingerprint,
    done_record,
    read_json,
    read_manifest,
    shard_path,
)
from lockstep.errors import InputError


def file_digest(path: Path) -> str:
    """xxh3-128 of a file, as lockstep.checkpoint.checksums takes it (not imported: that pulls in torch)."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


_TEMPORARY = re.compile(r"\.tmp\d+$")
"""What lockstep.data.cache.atomic_path names a file being written."""


def source_fingerprint(plan: dict, records: list[dict]) -> str:
    """The documents' fingerprint: the plan's own (the built-in corpus's sha256), else a sha256 over the
    source kind, text field and each shard's input digest, taken by the workers as they read the input."""
    if plan["source"].get("fingerprint"):
        return plan["source"]["fingerprint"]
    digest = hashlib.sha256(f"{plan['source']['kind']}/{plan['source']['text_field']}".encode())
    for shard, record in zip(plan["shards"], records, strict=True):
        digest.update(f"/{shard['file']}:{shard['start']}:{shard['end']}:{record['input_xxh3']}".encode())
    return digest.hexdigest()


def finalize(folder: Path, log: Callable[[str], None] = print) -> dict:
    """Write folder/manifest.json once every shard is done; InputError naming the missing shards otherwise."""
    folder = Path(folder)
    if not (folder / PLAN).is_file():
        raise InputError(folder, "holds no preparation (no plan.json)", "run lockstep data prepare --out FOLDER first")
    plan = read_json(folder / PLAN, PLAN_SHAPE)
    dtype = np.dtype(plan["dtype"])
    records = [done_record(folder, shard["name"], dtype) for shard in plan["shards"]]
    missing = [shard["name"] for shard, record in zip(plan["shards"], records, strict=True) if record is None]
    if missing:
        named = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise InputError(
            folder,
            f"{len(missing)} of {len(plan['shards'])} shards are not prepared yet: {named}",
            "run the remaining prepare jobs (same command with their --job-index), then finalize again",
        )
    source = {**plan["source"], "fingerprint": source_fingerprint(plan, records)}
    shards = [{**shard, **record} for shard, record in zip(plan["shards"], records, strict=True)]
    manifest = {
        **{k: v for k, v in plan.items() if k != "shards"},
        "source": source,
        "checksum": CHECKSUM,
        "num_tokens": sum(r["tokens"] for r in records),
        "num_documents": sum(r["documents"] for r in records),
        "fingerprint": dataset_fingerprint(source["fingerprint"], plan["tokenizer"]["fingerprint"]),
        "shards": shards,
    }
    text = json.dumps(manifest, indent=1)
    target = folder / MANIFEST
    if target.exists() and not target.is_file():
        raise InputError(target, "is not a file", "remove it, then finalize again")
    if not (target.is_file() and target.read_bytes() == text.encode()):
        with atomic_path(target) as tmp:
            tmp.write_text(text)
    stale = [p for p in [*folder.iterdir(), *(folder / SHARDS).iterdir()] if _TEMPORARY.search(p.name)]
    for path in stale:  # left by a killed writer; every shard is complete without them
        path.unlink(missing_ok=True)
    if stale:
        log(f"{folder}: removed {len(stale)} partial files left by an interrupted run")
    return manifest


def verify(folder: Path) -> list[str]:
    """Every mismatch between the folder's files and its manifest (empty when it is intact): each shard's
    token file and document index re-hashed, and the tokenizer file's sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    if manifest["tokenizer"]["kind"] != "bytes":
        tokenizer = folder / TOKENIZER_FILE
        if not tokenizer.is_file():
            problems.append(f"{tokenizer}: missing")
        elif hashlib.sha256(tokenizer.read_bytes()).hexdigest() != manifest["tokenizer"]["fingerprint"]:
            problems.append(f"{tokenizer}: differs from the tokenizer the shards were made with")
    for shard in manifest["shards"]:
        for suffix, key in (("tokens", "tokens_xxh3"), ("docs", "docs_xxh3")):
            path = shard_path(folder, shard["name"], suffix)
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif file_digest(path) != shard[key]:
                problems.append(f"{path}: content differs from the manifest's {CHECKSUM} checksum")
    return problems
