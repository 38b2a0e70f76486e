"""``lockstep inspect RUN --step N``: the samples of a step, where each came from, and with --losses each
one's loss, replayed (lockstep.tools.inspect_step). Reads the run folder, writes nothing into it."""

from __future__ import annotations

import json
from pathlib import Path

from lockstep.cli import print_json
from lockstep.cli.arguments import Parser, integer


def run(argv: list[str]) -> int:
    parser = Parser(
        prog="lockstep inspect",
        description="Show the global sample indices of a training step, each sample's source file, document and "
        "token offset, and a decoded preview; --losses replays the step for each sample's loss.",
    )
    parser.add_argument("run", type=Path, help="a run folder")
    parser.add_argument("--step", type=integer(0), required=True)
    parser.add_argument("--losses", action="store_true", help="replay the step for per-sample losses (checked)")
    parser.add_argument(
        "--preview-tokens", type=integer(0, 10**6), default=48, help="tokens decoded per sample (default 48)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    from lockstep.tools.inspect_step import add_losses, describe, step_samples

    found = step_samples(args.run, args.step, args.preview_tokens)
    if args.losses:
        add_losses(args.run, found)
    if args.json:
        print_json(json.dumps(found.as_json()))
    else:
        print(describe(args.run, found), flush=True)
    return 1 if found.loss_matches is False else 0
