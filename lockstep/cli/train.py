"""``lockstep train``, ``python -m lockstep.train`` and ``torchrun -m lockstep.train``: train a model.

With ``--nproc N`` the config is checked here, then torchrun starts N processes (lockstep.cli.launch).
"""

from __future__ import annotations

import argparse

from lockstep.config import load_config, validate_job_config


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lockstep train",
        description="Train a model. Any other --section.key value pair overrides the config "
        "(e.g. --training.steps 10 --debug.deterministic).",
    )
    parser.add_argument("--config", help="a shipped config name (e.g. llama3_debug) or a TOML file path")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="start N processes on this machine through torchrun (multi-node: torchrun)",
    )
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    if args.nproc is not None:
        from lockstep.cli.launch import launch_torchrun

        validate_job_config(config, args.nproc)  # fail here, before N processes start
        return launch_torchrun(args.nproc, argv)
    from lockstep.train.trainer import Trainer

    trainer = Trainer(config)
    if config.debug.print_config:
        from lockstep.config import dump_toml

        print(dump_toml(config))
    with trainer:
        run_folder = trainer.train()
    if trainer.world.is_main:
        print(f"run folder: {run_folder.resolve()}")
    return 0
