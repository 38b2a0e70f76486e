"""Checkpoint folders: ``step-00000120`` under the checkpoint root, each published atomically.

A checkpoint is written under ``step-N.partial``; when every rank has finished, rank 0 writes the
manifest (``lockstep.json``: what was saved, fingerprints, and every file's size) and renames the
folder. So a ``step-N`` folder is complete by construction, a kill at any moment leaves at most a
``.partial`` folder that nothing loads, and a file damaged later is caught by the size check: the
loader skips that checkpoint (with a message) for the next older one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MANIFEST = "lockstep.json"
PARTIAL = ".partial"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def partial_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}{PARTIAL}"


def published_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every published checkpoint, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_FOLDER.match(p.name)) and p.is_dir()]
    return sorted(found)


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def problem_with(folder: Path) -> str | None:
    """Why `folder` cannot be loaded, or None if its manifest and files are intact."""
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as e:
        return f"no readable {MANIFEST} ({e.__class__.__name__})"
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"file {name} is missing"
        if path.stat().st_size != size:
            return f"file {name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def find_checkpoint(root: Path, load_step: int, warn, prefer_full: bool = False) -> Path | None:
    """The folder to resume from: step `load_step` (which must be intact), or with -1 the newest
    intact one (damaged ones are reported through `warn` and skipped). With prefer_full, a newer
    model-only checkpoint (a final export) is passed over for an older full one, so training resumes
    where it can; a model-only one (a seed checkpoint) is taken only when there is nothing else."""
    published = published_steps(root)
    if load_step >= 0:
        folder = dict(published).get(load_step)
        if folder is None:
            steps = ", ".join(str(s) for s, _ in published) or "none"
            raise FileNotFoundError(f"no checkpoint for step {load_step} in {root} (published steps: {steps})")
        if problem := problem_with(folder):
            raise ValueError(f"checkpoint {folder} is damaged: {problem}")
        return folder
    intact = []
    for _, folder in reversed(published):
        if problem := problem_with(folder):
            warn(f"skipping damaged checkpoint {folder}: {problem}")
            continue
        intact.append(folder)
    if prefer_full:
        full = [f for f in intact if not read_manifest(f).get("model_only")]
        intact = full or intact
    return intact[0] if intact else None


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(partial: Path, final: Path, manifest: dict) -> None:
    """Record every file's size in the manifest, make it durable, then rename into place."""
    for path in partial.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    files = {p.name: p.stat().st_size for p in sorted(partial.iterdir())}
    manifest_path = partial / MANIFEST
    with open(manifest_path, "w") as f:
        json.dump(manifest | {"files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_folder(partial)
    if final.exists():  # a same-step checkpoint from an earlier attempt: replace it
        shutil.rmtree(final)
    os.rename(partial, final)
    _fsync_folder(final.parent)


def prune(root: Path, keep_latest_k: int, in_progress: Path | None = None) -> None:
    """Delete all but the newest `keep_latest_k` published checkpoints (0 keeps all) and any
    leftover partial folders of interrupted saves."""
    if keep_latest_k > 0:
        for _, folder in published_steps(root)[:-keep_latest_k]:
            shutil.rmtree(folder, ignore_errors=True)
    for leftover in root.glob(f"step-*{PARTIAL}"):
        if leftover != in_progress:
            shutil.rmtree(leftover, ignore_errors=True)
