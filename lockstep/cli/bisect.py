"""``lockstep bisect``: the first step and module where two runs differ."""

from __future__ import annotations

from pathlib import Path

from lockstep.cli.arguments import Parser


def run(argv: list[str]) -> int:
    parser = Parser(
        prog="lockstep bisect",
        description="Find the first step where two runs differ and the first module (or the reduction, "
        "or the optimizer update) that makes the difference, by replaying that step with hooks.",
    )
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--work", type=Path, default=None, help="where replay captures go (default: a temp dir)")
    args = parser.parse_args(argv)
    import tempfile

    from lockstep.tools.bisect import bisect

    work = args.work or Path(tempfile.mkdtemp(prefix="lockstep-bisect-"))
    finding = bisect(args.run_a, args.run_b, work)
    print(finding.describe())
    return 0 if finding.step is None else 1
