"""``lockstep replay RUN --step N``: recompute a step on this machine and compare it with the run's record
(lockstep.tools.reproduce). Exit 0 when it reproduces bitwise, 1 when it does not (naming the first
rank and tensor that differ), 2 for a bad run folder or a step without fingerprints."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lockstep.cli import print_json
from lockstep.cli.arguments import Parser, integer


def run(argv: list[str]) -> int:
    parser = Parser(
        prog="lockstep replay",
        description="Recompute step N from the newest checkpoint before it, in the run's layout, and compare loss, "
        "grad norm and fingerprints with the recorded ones; on a difference name the first rank and tensor.",
    )
    parser.add_argument("run", type=Path, help="a run folder trained with --debug.fingerprint")
    parser.add_argument("--step", type=integer(0), required=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    from lockstep.tools.inspect_step import check_run
    from lockstep.tools.reproduce import reproduce

    check_run(args.run)
    work = Path(tempfile.mkdtemp(prefix="lockstep-replay-"))
    try:
        verdict = reproduce(args.run, args.step, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print_json(json.dumps(verdict.as_json()))
    else:
        print(verdict.describe(), flush=True)
    return 0 if verdict.reproduced else 1
