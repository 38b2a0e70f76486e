"""Checkpoint problems a user can fix (or choose around): one line naming the checkpoint and the way out."""

from __future__ import annotations

from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from lockstep.errors import InputError, LockstepError


class CheckpointError(InputError):
    """An unusable or protected checkpoint: damaged, unsafe to unpickle, or in the way of a save."""

    def __reduce__(self):
        # Picklable with its fields, so DCP can gather one rank's failure to every rank.
        return (type(self), (self.path, self.problem, self.fix))


class CheckpointMismatch(LockstepError):
    """The checkpoint belongs to another setup (model, tokenizer, dataset): not damaged, so never set aside."""


def disk_failure(error: BaseException) -> OSError | None:
    """The OSError behind a failed save (a full disk, a lost mount, a folder made read-only), wherever DCP
    wrapped it (CheckpointException carries each rank's failure), or None for any other failure."""
    seen, stack = set(), [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        if isinstance(current, CheckpointException):
            stack += [failure for failure, _ in current.failures.values()]
        stack += [current.__cause__, current.__context__]
    return None


def save_refused(partial: Path, error: OSError, newest: int | None) -> CheckpointError:
    """One line for a save the file system refused: what it said, and which checkpoint is still the newest
    complete one (the cut-short save stays a .partial folder, never published)."""
    kept = f"step {newest} is still the newest complete checkpoint" if newest is not None else "no checkpoint was kept"
    return CheckpointError(
        partial, f"could not be written ({error.strerror or error}); {kept}",
        "free space on that file system (or set checkpoint.folder elsewhere) and rerun to resume",
    )  # fmt: skip
