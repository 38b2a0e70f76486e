"""``data.mixture``: read and check its ``FOLDER:WEIGHT`` entries before any process group starts.

Only what the config alone can tell is checked here (the form, the weights, that each folder exists,
that the names differ); the folders' manifests and tokenizers are checked when the data is loaded
(lockstep.data.mixture). Weights are kept as exact fractions of the text the user wrote (0.7 is 7/10),
so the interleaving built from them (lockstep.data.interleave) is exact, not a float's neighbour.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from lockstep.config.errors import ConfigError

KEY = "data.mixture"
SMALLEST_SHARE = Fraction(1, 1_000_000)
"""The smallest weight, as a share of the total, that the interleaving can represent (its period is at
most 1 / SMALLEST_SHARE samples)."""


@dataclass(frozen=True)
class MixtureEntry:
    name: str
    """The source's name: its folder's name (metrics log data/tokens/NAME)."""
    folder: Path
    weight: Fraction
    """As written (not yet normalised)."""


def parse_mixture(entries: list[str]) -> list[MixtureEntry]:
    """The entries, checked; ConfigError naming data.mixture and the fix otherwise."""
    parsed = [_parse_entry(entry) for entry in entries]
    by_name: dict[str, MixtureEntry] = {}
    for entry in parsed:
        if entry.name in by_name:
            raise ConfigError(
                KEY,
                f"two sources are named {entry.name!r} ({by_name[entry.name].folder} and {entry.folder}): a source is "
                "named by its folder's name, so rename one folder (or link it under another name)",
            )
        by_name[entry.name] = entry
    total = sum((entry.weight for entry in parsed), Fraction(0))
    for entry in parsed:
        if entry.weight / total < SMALLEST_SHARE:
            raise ConfigError(
                KEY,
                f"{entry.name} has weight {entry.weight} of {total}, under the smallest share the interleaving "
                f"represents ({SMALLEST_SHARE}); raise it or drop the source",
            )
    return parsed


def _parse_entry(entry: str) -> MixtureEntry:
    folder, sep, weight_text = entry.strip().rpartition(":")
    if not sep or not folder:
        raise ConfigError(
            KEY, f"{entry!r} has no weight; write FOLDER:WEIGHT, e.g. {entry.strip().rstrip(':') or 'FOLDER'}:0.5"
        )
    try:
        weight = Fraction(weight_text.strip())
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            KEY, f"{entry!r}: weight {weight_text!r} is not a number; write FOLDER:WEIGHT, e.g. {folder}:0.5"
        ) from None
    if weight <= 0:
        raise ConfigError(KEY, f"{entry!r}: weight must be > 0; give it a positive weight or drop the entry")
    folder = folder.strip()
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(KEY, f"{entry!r}: no such folder {folder}{_did_you_mean(path)}")
    # The name as given (a link keeps its own name, so linking a folder under another name tells two apart).
    return MixtureEntry(Path(os.path.abspath(path)).name, path, weight)


def _did_you_mean(path: Path) -> str:
    """A close name in the folder's parent, else how to make the folder."""
    parent = path.parent if path.parent.is_dir() else None
    siblings = [p.name for p in parent.iterdir() if p.is_dir()] if parent is not None else []
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {parent / close[0]}?"
    return f"; prepare it first: lockstep data prepare ... --out {path}"
