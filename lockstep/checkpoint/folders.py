"""Checkpoint folders: ``step-00000120`` under the checkpoint root, each published atomically.

A checkpoint is written under ``step-N.partial``; when every rank has finished, rank 0 writes the
manifest (``lockstep.json``: what was saved, fingerprints, every file's size and, from format 2, its
xxh3-128 content checksum) and renames the folder. So a ``step-N`` folder with a manifest is complete
by construction, and a kill at any moment leaves at most a ``.partial`` folder that nothing loads. A
file damaged later is caught before the load by the size check and the pickle allow-list for the
non-tensor items (both cheap, `problem_with`), and during the load by the checksums, which the reader
verifies as it reads (lockstep.checkpoint.safe_reader: no second read of the files); either way the
resume skips that checkpoint (with a message) for the next older one. Format-1 checkpoints (no
checksums) still load, without the checksum check.

Nothing here destroys a checkpoint silently: publishing over an existing step folder, pruning, and
step folders without a manifest (never pruned, never replaced) are the caller's explicit decisions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from lockstep.checkpoint import checksums
from lockstep.checkpoint.errors import CheckpointError
from lockstep.checkpoint.manifest import MANIFEST, read_manifest, recorded_model
from lockstep.checkpoint.safe_reader import unsafe_item
from lockstep.errors import InputError

__all__ = ["MANIFEST", "read_manifest"]  # re-exported: the folder helpers' callers read manifests through here

PARTIAL = ".partial"
FORMAT = 2
"""Manifest format: 1 = file sizes; 2 = sizes and xxh3-128 checksums."""
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def partial_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}{PARTIAL}"


def require_new_or_empty(out_dir: Path, what: str) -> None:
    """Refuse an output folder of a conversion that exists and is not empty (or is a file): `what`
    ("an export") writes only where it can destroy nothing."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(
            out_dir, f"exists and is not an empty folder; {what} never overwrites", "give a new or empty folder"
        )


def published_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step folder (published, or with its manifest lost), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_FOLDER.match(p.name)) and p.is_dir()]
    return sorted(found)


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def problem_with(folder: Path, content: bool = True, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why `folder` cannot be loaded, or None if it looks intact: the manifest and the sizes of the files
    it lists, and with `content` the non-tensor items unpickled through the allow-list (small; one rank
    is enough, CheckpointManager has the ranks agree). `share` = (rank, world) checks only every
    world-th file from rank on: a checkpoint of W ranks holds O(W) files, and each rank checking all
    of them would cost the file system O(W^2) stats at every resume. The checksums are verified while
    the checkpoint loads (SafeFileSystemReader), so a same-size corruption shows up there, not here."""
    try:
        manifest = read_manifest(folder)
    except InputError as e:
        return f"{MANIFEST} {e.problem}" if e.problem.startswith("is ") else f"{MANIFEST}: {e.problem}"
    try:
        recorded_model(folder, manifest)
    except InputError as e:
        return f"{MANIFEST}: {e.problem}"
    rank, world = share
    for name, size in sorted(manifest.get("files", {}).items())[rank::world]:
        path = folder / name
        try:
            found = path.lstat()
        except FileNotFoundError:
            return f"file {name} is missing"
        if stat.S_ISLNK(found.st_mode):
            return f"file {name} is a link, not a file of the checkpoint"
        if not stat.S_ISREG(found.st_mode):
            return f"file {name} is missing"
        if found.st_size != size:
            return f"file {name} has {found.st_size} bytes, the manifest says {size}"
    if not content:
        return None
    return unsafe_item(folder)


def find_checkpoint(
    root: Path,
    load_step: int,
    warn: Callable[[str], None],
    prefer_full: bool = False,
    check: Callable[[Path], str | None] = problem_with,
) -> Path | None:
    """The folder to resume from: step `load_step` (which must be intact), or with -1 the newest
    intact one (damaged ones are reported through `warn` and skipped). With prefer_full, a newer
    model-only checkpoint (a final export) is passed over for an older full one, so training resumes
    where it can; a model-only one (a seed checkpoint) is taken only when there is nothing else.
    Candidates are checked newest first and the search stops at the first intact one."""
    published = published_steps(root)
    if load_step >= 0:
        folder = dict(published).get(load_step)
        if folder is None:
            steps = ", ".join(str(s) for s, _ in published) or "none"
            raise CheckpointError(
                root, f"no checkpoint for step {load_step} (published steps: {steps})", "choose one of those steps"
            )
        if problem := check(folder):
            raise CheckpointError(folder, f"damaged checkpoint: {problem}", "choose another checkpoint.load_step")
        return folder
    newest_first = [folder for _, folder in reversed(published)]
    if prefer_full:
        full = [f for f in newest_first if has_manifest(f) and not _model_only(f)]
        newest_first = full + [f for f in newest_first if f not in full]
    for folder in newest_first:
        if problem := check(folder):
            warn(f"skipping damaged checkpoint {folder}: {problem}")
            continue
        return folder
    return None


def _model_only(folder: Path) -> bool:
    try:
        return bool(read_manifest(folder).get("model_only"))
    except (OSError, ValueError):
        return False


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(
    partial: Path, final: Path, manifest: dict, written: dict[str, list] | None = None, replace: bool = False
) -> None:
    """Record every file's size and checksum in the manifest, make it durable, then rename into place.
    `written` ({name: [size, digest]}, every rank's, from the save's write results) spares reading the
    data files again; a file it lacks (DCP's ``.metadata``) is hashed from disk. The writers made their
    own files durable (DCP's sync_files), so only the manifest and the folder are synced here. An
    existing `final` is replaced only with `replace`."""
    if final.exists() and not replace:
        raise CheckpointError(
            final, "a checkpoint of this step exists already and would be overwritten",
            "move it away, or pass --checkpoint.discard_newer to replace it",
        )  # fmt: skip
    recorded = dict(written or {})
    recorded |= checksums.hash_unrecorded(partial, recorded)
    files = {name: size for name, (size, _) in sorted(recorded.items())}
    digests = {name: digest for name, (_, digest) in sorted(recorded.items())}
    manifest_path = partial / MANIFEST
    with open(manifest_path, "w") as f:
        record = {"format": FORMAT, "checksum": checksums.ALGORITHM, "files": files, "checksums": digests}
        json.dump(manifest | record, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_folder(partial)
    if final.exists():  # replace allowed: an explicit --checkpoint.discard_newer
        shutil.rmtree(final)
    os.rename(partial, final)
    _fsync_folder(final.parent)


def _holds_only_its_files(folder: Path) -> bool:
    """The step folder holds nothing but the files its manifest lists (and the manifest)."""
    try:
        listed = set(read_manifest(folder).get("files", {})) | {MANIFEST}
    except (OSError, ValueError):
        return False
    return all(entry.name in listed and entry.is_file() for entry in folder.iterdir())


def prune(root: Path, keep_latest_k: int, in_progress: Path | None = None) -> None:
    """Delete all but the newest `keep_latest_k` published checkpoints (0 keeps all) and any
    leftover partial folders of interrupted saves. Step folders without a manifest, or holding
    anything their manifest does not list, are never pruned: what they hold is unknown, so a person
    decides."""
    if keep_latest_k > 0:
        published = [folder for _, folder in published_steps(root) if has_manifest(folder)]
        for folder in published[:-keep_latest_k]:
            if _holds_only_its_files(folder):  # anything else put there is not lockstep's to delete
                shutil.rmtree(folder, ignore_errors=True)
    for leftover in root.glob(f"step-*{PARTIAL}"):
        if leftover != in_progress:
            shutil.rmtree(leftover, ignore_errors=True)
