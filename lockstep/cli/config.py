"""``lockstep config from-torchtitan FILE [--out OUT]``: a torchtitan job (0.2 TOML, 0.3 job.json) as a
lockstep config."""

from __future__ import annotations

import sys
from pathlib import Path

from lockstep.cli.arguments import Parser


def run(argv: list[str]) -> int:
    parser = Parser(prog="lockstep config", description="Translate job configs from other trainers.")
    sub = parser.add_subparsers(dest="action", required=True)
    titan = sub.add_parser(
        "from-torchtitan",
        help="a torchtitan job (a 0.2 TOML, or the job.json of 0.3's --debug.save_config_file) -> a lockstep config (TOML)",
    )
    titan.add_argument("file", type=Path)
    titan.add_argument("--out", type=Path, default=None, help="write the config here (a new file); default stdout")
    args = parser.parse_args(argv)
    import tomli_w

    from lockstep.cli import report
    from lockstep.errors import InputError
    from lockstep.tools.torchtitan_config import from_torchtitan

    try:
        translation = from_torchtitan(args.file)
        if args.out is not None and args.out.exists():
            raise InputError(args.out, "exists already", "give a new file to --out (nothing is overwritten)")
    except InputError as error:
        return report("config", error)
    text = tomli_w.dumps(translation.config)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    for note in translation.unmapped:
        print(f"note: torchtitan {note}", file=sys.stderr)
    if translation.left_off:
        print(f"note: torchtitan options left off, which lockstep lacks (nothing lost): {', '.join(translation.left_off)}",
              file=sys.stderr)  # fmt: skip
    return 0
