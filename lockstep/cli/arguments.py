"""The commands' argument parsing: argparse, with one-line errors and number types that refuse what no
command can use (NaN, infinities, negative counts), so that a bad option is one line and exit 2 like
every other bad input, not the whole usage text or a traceback from deep inside the command."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line naming the option and pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number within [low, high] (either bound may be open)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else (f"<= {high}" if low is None else f"in {low} .. {high}")
            raise argparse.ArgumentTypeError(f"{value} must be {bounds}")
        return value

    return parse


def number(low: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number >= low (> low with `above`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"{value:g} must be {'>' if above else '>='} {low:g}")
        return value

    return parse


MAX_PROCESSES_PER_MACHINE = 1024
"""More processes than any machine runs (torchrun --nproc-per-node): a typo, refused before a launch."""
