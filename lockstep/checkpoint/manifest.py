"""The checkpoint manifest (``lockstep.json``) and the one check of its shape, shared by the folder helpers
and the safe reader: every file name it records must name a plain file in the step folder."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from lockstep.config.errors import ConfigError
from lockstep.errors import InputError
from lockstep.models.registry import ModelSpec, checked_args, model_spec
from lockstep.untrusted import Bool, Int, ListOf, MapOf, Obj, Optional, Str, load_toml, read_json

MANIFEST = "lockstep.json"
PLAIN_FILE_NAME = r"(?!\.\.?$)[^/\\\x00]+"
"""A name that can only mean a file directly in its folder: no separator, not '.' or '..', no NUL, not
absolute. Every file name a checkpoint records must be one, so no crafted manifest can make a load open
anything outside the step folder (``/dev/zero``, ``../../etc/hostname``)."""

SHAPE = Obj(
    required={
        "step": Int(min=0),
        "model": Obj(required={"name": Str(), "args": MapOf()}),
        "files": MapOf(Int(min=0), name=Str(pattern=PLAIN_FILE_NAME)),
    },
    optional={
        "format": Int(min=1),
        "checksums": MapOf(Str(pattern=r"[0-9a-f]{32}"), name=Str(pattern=PLAIN_FILE_NAME)),
        "model_only": Bool(),
        "parts": ListOf(Str()),
        "layout": MapOf(),
        "config": MapOf(MapOf()),
        "fingerprints": MapOf(Optional(Str())),
    },
)
"""What lockstep writes (``CheckpointManager.save``, ``convert from-hf``); other keys are the record's."""


def read_manifest(folder: Path) -> dict:
    """The manifest, its shape checked: InputError naming the file and the key for one that is not
    lockstep's (damaged or crafted). ``files`` maps plain file names to byte counts, ``checksums`` plain
    names of listed files to xxh3-128 hex digests."""
    path = folder / MANIFEST
    manifest = read_json(path, SHAPE, fix="", max_bytes=64 * 2**20)
    if (manifest.get("format") or 1) >= 2 and not isinstance(manifest.get("checksums"), dict):
        raise InputError(path, "checksums: expected an object (a format-2 checkpoint records every file's checksum)")
    if unlisted := sorted(set(manifest.get("checksums") or {}) - set(manifest["files"])):
        raise InputError(path, f"checksums.{unlisted[0]}: names a file that 'files' does not list")
    return manifest


def recorded_model(folder: Path, manifest: dict) -> tuple[ModelSpec, Any]:
    """The model family and *Args a manifest records, checked as an HF config.json is (``checked_args``):
    a crafted ``model.args`` (a billion layers, a string for a size) is refused before anything is built."""
    where, fix = folder / MANIFEST, "it was changed after saving; load another checkpoint"
    try:
        spec = model_spec(manifest["model"]["name"])
    except ConfigError as error:
        raise InputError(where, f"model.name: {error}", fix) from None
    return spec, checked_args(spec, lambda: spec.args_from_dict(manifest["model"]["args"]), where=where, fix=fix)


def recorded_args(manifest: dict, fields: Collection[str]) -> dict:
    """The manifest's ``model.args``, with those of `fields` (a run's) that it lacks at their defaults,
    for comparing with that run's: a field added to the family's *Args after the checkpoint was written
    (llama3's ``tie_embeddings``) was built at its default, so an older checkpoint still matches a run
    that keeps it."""
    recorded = manifest["model"]["args"]
    try:
        defaults = dataclasses.asdict(model_spec(manifest["model"]["name"]).args_from_dict({}))
    except (ConfigError, TypeError, ValueError):  # not a family of this version: compared as recorded
        return recorded
    return {k: v for k, v in json.loads(json.dumps(defaults)).items() if k in fields} | recorded


def recorded_config(folder: Path, manifest: dict) -> dict | None:
    """The run config a checkpoint was trained with: its manifest's record, else (a manifest written
    before configs were recorded) the config.toml of the run folder above it; None without either."""
    if manifest.get("config") is not None:
        return manifest["config"]
    enclosing = next((p / "config.toml" for p in folder.parents if (p / "config.toml").is_file()), None)
    if enclosing is None:
        return None
    try:
        return load_toml(enclosing.read_bytes())
    except (OSError, ValueError) as e:
        raise InputError(enclosing, f"is not valid TOML ({e})") from None
