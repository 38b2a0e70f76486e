"""``lockstep eval PATH``: the held-out loss, perplexity and token count of a run folder's newest
checkpoint, a checkpoint step folder, or a Hugging Face folder (lockstep.tools.evaluate).

``--validation.*`` / ``--training.*`` / ``--parallelism.*`` overrides apply as in training; ``--nproc N``
evaluates on N processes (torchrun), in any layout, with the same result as one process where the
layouts are bitwise (docs/layout-invariance.md). Nothing is written into PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from lockstep.cli import EXIT_BAD_INPUT, EXIT_OK, print_json
from lockstep.cli.arguments import MAX_PROCESSES_PER_MACHINE, Parser, integer
from lockstep.errors import LockstepError


def run(argv: list[str]) -> int:
    parser = Parser(
        prog="lockstep eval",
        description="Evaluate a checkpoint's held-out loss. Other --section.key value pairs override the config "
        "(e.g. --validation.steps 10 --validation.dataset json --validation.dataset_path val.jsonl).",
    )
    parser.add_argument("path", type=Path, help="a run folder, a checkpoint step-N folder or a Hugging Face folder")
    parser.add_argument("--config", help="the config for a Hugging Face folder (a preset name or TOML path)")
    parser.add_argument(
        "--nproc",
        type=integer(1, MAX_PROCESSES_PER_MACHINE),
        default=None,
        help="evaluate on N processes on this machine",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--scratch", type=Path, default=None, help=argparse.SUPPRESS)  # given to the workers
    args, overrides = parser.parse_known_args(argv)
    from lockstep.config import validate_job_config
    from lockstep.tools.evaluate import evaluation_config, evaluation_json

    owned = args.scratch is None
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="lockstep-eval-"))
    try:
        config = evaluation_config(args.path, args.config, overrides, scratch)
        if args.nproc is not None:
            from lockstep.cli.launch import check_nproc, launch_torchrun

            check_nproc(args.nproc)
            validate_job_config(config, args.nproc)  # fail here, before N processes start
            return launch_torchrun(args.nproc, [*argv, "--scratch", str(scratch)], command="eval")
        from lockstep.train.trainer import Trainer

        with Trainer(config, show_progress=False) as trainer:  # weights from checkpoint.initial_load_path
            result = trainer.validator.evaluate()
    except LockstepError as error:
        from lockstep.cli.launch import record_worker_error

        if record_worker_error(error):  # a worker of `--nproc N`: the launcher prints the one line
            return EXIT_BAD_INPUT
        raise
    finally:
        if owned:  # made above, and only ever holds this evaluation's scratch run
            shutil.rmtree(scratch, ignore_errors=True)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            print_json(evaluation_json(result, args.path))
        else:
            record = result.as_record()
            print(
                f"val_loss {record['val_loss']:.6f}  val_ppl {record['val_ppl']:.4f}  val_tokens {record['val_tokens']}",
                flush=True,
            )
    return EXIT_OK
