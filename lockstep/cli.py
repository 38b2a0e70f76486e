"""The ``lockstep`` command: ``lockstep train --config NAME_OR_PATH [--section.key value ...]``."""

from __future__ import annotations

import argparse
import sys

from lockstep.config import ConfigError, load_config, validate_job_config


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lockstep train",
        description="Train a model. Any other --section.key value pair overrides the config "
        "(e.g. --training.steps 10 --debug.deterministic).",
    )
    parser.add_argument("--config", help="a shipped config name (e.g. llama3_debug) or a TOML file path")
    parser.add_argument(
        "--nproc", type=int, default=0, help="start N processes on this machine through torchrun (multi-node: torchrun)"
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides)
        if args.nproc > 0:
            validate_job_config(config, args.nproc)  # fail here, before N processes start
            return _torchrun(args.nproc, argv)
        from lockstep.train.trainer import Trainer

        trainer = Trainer(config)
    except ConfigError as e:
        print(f"lockstep: config error: {e}", file=sys.stderr)
        return 2
    if config.debug.print_config:
        from lockstep.config import dump_toml

        print(dump_toml(config))
    with trainer:
        run_folder = trainer.train()
    print(f"run folder: {run_folder.resolve()}")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun --standalone with N processes (one machine), one share of
    the CPU threads each unless OMP_NUM_THREADS is set."""
    import os
    import subprocess

    forwarded, skip = [], False
    for arg in argv:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            forwarded.append(arg)
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "lockstep.train", *forwarded]
    return subprocess.call(command, env=os.environ | {"OMP_NUM_THREADS": threads})


def _config_reference(argv: list[str]) -> int:
    from lockstep.config.reference import config_reference

    print(config_reference())
    return 0


COMMANDS = {"train": _train, "config-reference": _config_reference}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: lockstep {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
