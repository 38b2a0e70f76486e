"""``lockstep compare``: runs (folders or loss files) side by side; exact or tolerance gates for CI.

Above the table: the config keys and environment facts that differ between the runs. Under a gate
(``--assert-equal``, ``--rtol``, ``--atol``) it exits 1 on a difference, when the runs logged different
steps (a run that crashed early; ``--common-steps-only`` gates on the common ones) and when no step is
common, so that a gate never passes on runs it did not compare; an empty, unreadable or malformed
run is one line and exit 2. Where the runs logged ``val_loss``, a second table compares it at their
common evaluation steps, under the same gate (evaluation steps only some runs have are noted, not gated).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lockstep.cli import EXIT_FAILURE
from lockstep.cli.arguments import MAX_PROCESSES_PER_MACHINE, Parser, integer, number

PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")
"""What matplotlib writes from the file name's suffix."""


def _check_plot_path(path: Path) -> None:
    from lockstep.errors import InputError

    if path.suffix.lower() not in PLOT_FORMATS:
        raise InputError(path, f"has no image suffix matplotlib writes ({', '.join(PLOT_FORMATS)})", "name a .png")
    if not path.parent.is_dir():
        raise InputError(path.parent, "does not exist (the plot's folder)", "create it, or plot into another folder")
    if path.exists() and not path.is_file():
        raise InputError(path, "exists and is not a file", "give a file name for the plot")


def run(argv: list[str]) -> int:
    parser = Parser(
        prog="lockstep compare",
        description="Compare runs (run folders or loss files) step by step; with --run, launch them first.",
    )
    parser.add_argument("runs", nargs="*", type=Path, help="run folders or loss files (JSONL)")
    parser.add_argument(
        "--assert-equal", action="store_true", help="exit 1 unless bitwise equal at every step of every run"
    )
    parser.add_argument("--rtol", type=number(0), default=None, help="exit 1 if a loss differs beyond rtol/atol")
    parser.add_argument("--atol", type=number(0), default=None)
    parser.add_argument(
        "--common-steps-only",
        action="store_true",
        help="gate on the steps all runs logged (by default a step one run lacks fails the gate)",
    )
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the curves and their difference")
    parser.add_argument("--run", action="store_true", help="launch the runs: two --config, or one and two --rev")
    parser.add_argument("--config", action="append", default=[], help="with --run: a config (twice for two)")
    parser.add_argument("--rev", action="append", default=[], help="with --run: a git revision (twice)")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="with --run: where runs go")
    parser.add_argument("--seed", type=integer(0, 2**63 - 1), default=0)
    parser.add_argument("--nproc", type=integer(1, MAX_PROCESSES_PER_MACHINE), default=1)
    args, overrides = parser.parse_known_args(argv)
    from lockstep.tools import compare

    if args.plot is not None:
        _check_plot_path(args.plot)  # before any run is launched or read
    runs = args.runs
    if args.run:
        if not (len(args.config) == 2 and not args.rev) and not (len(args.config) == 1 and len(args.rev) == 2):
            parser.error("--run needs two --config, or one --config and two --rev")
        from lockstep.tools.run_pair import SideFailed, launch_pair

        try:
            runs = launch_pair(args.config, args.rev, overrides, args.out, args.seed, args.nproc)
        except SideFailed as failed:
            print(f"lockstep compare: error: {failed}", file=sys.stderr, flush=True)
            return EXIT_FAILURE
    elif overrides:
        parser.error(f"unknown arguments {overrides}")
    if len(runs) < 2:
        parser.error("give at least two runs")
    names = [str(r) for r in runs]
    resolved = [Path(r).resolve() for r in runs]
    if len(set(resolved)) < len(resolved):  # a run against itself proves nothing: a gate must not pass on it
        from lockstep.errors import InputError

        same = next(r for r in resolved if resolved.count(r) > 1)
        raise InputError(same, "is given twice (or through a link); a run compared with itself proves nothing",
                         "give two different runs")  # fmt: skip
    series = [compare.load_series(r) for r in runs]  # InputError: one line, exit 2
    gated = args.assert_equal or args.rtol is not None or args.atol is not None
    for line in compare.describe_run_differences(runs):
        print(line)
    rows = compare.compare_series(series)
    print(compare.format_table(rows, names))
    missing = compare.steps_missing(series)
    for name, steps in zip(names, missing, strict=True):
        if steps:
            print(f"{name} lacks {len(steps)} step(s) the other runs logged: {compare.describe_steps(steps)}")
    first = compare.first_difference(rows, args.rtol, args.atol)
    tolerance = f" beyond rtol={args.rtol} atol={args.atol}" if (args.rtol or args.atol) else " (bitwise)"
    if not rows:
        print("no common step: nothing was compared")
    elif first is not None:
        print(f"first differing step{tolerance}: {first}")
    else:
        print(f"no difference{tolerance} at the {len(rows)} common step(s)")
    evaluations, val_first = _report_validation(series, names, args.rtol, args.atol, tolerance)
    plot = args.plot or (args.out / "compare.png" if args.run else None)
    if plot is not None and rows:
        compare.plot(rows, names, plot, evaluations)
        print(f"plot: {plot}")
    if not gated:
        return 0
    if not rows or first is not None or val_first is not None:
        return 1
    if any(missing) and not args.common_steps_only:
        print("the runs logged different steps: the gate fails (--common-steps-only gates on the common ones)")
        return 1
    return 0


def _report_validation(
    series: list[dict[int, dict]], names: list[str], rtol: float | None, atol: float | None, tolerance: str
) -> tuple[list, int | None]:
    """Print the val_loss table, notes and verdict (nothing when no run logged a val_loss); return the
    compared evaluations and the first differing evaluation step (None: none)."""
    from lockstep.tools import compare

    evaluations = compare.compare_validation(series)
    first = compare.first_difference(evaluations, rtol, atol)
    if evaluations:
        print()
        print(compare.format_validation_table(evaluations, names))
    for name, steps in zip(names, compare.evaluations_missing(series), strict=True):
        if steps:
            print(
                f"{name} lacks val_loss at {len(steps)} step(s) another run evaluated: " + compare.describe_steps(steps)
            )
    if first is not None:
        print(f"first differing evaluation step{tolerance}: {first}")
    elif evaluations:
        print(f"no val_loss difference{tolerance} at the {len(evaluations)} common evaluation step(s)")
    return evaluations, first
