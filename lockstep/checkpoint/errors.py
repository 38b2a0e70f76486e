"""Checkpoint problems a user can fix (or choose around): one line naming the checkpoint and the way out."""

from __future__ import annotations

from lockstep.errors import InputError


class CheckpointError(InputError):
    """An unusable or protected checkpoint: damaged, unsafe to unpickle, or in the way of a save."""

    def __reduce__(self):
        # Picklable with its fields, so DCP can gather one rank's failure to every rank.
        return (type(self), (self.path, self.problem, self.fix))
