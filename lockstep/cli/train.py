"""``lockstep train``, ``python -m lockstep.train`` and ``torchrun -m lockstep.train``: train a model.

With ``--nproc N`` the config is checked here, then torchrun starts N processes (lockstep.cli.launch).
Exit codes: 0 trained to training.steps; 75 stopped by SIGTERM/SIGINT/SIGHUP after saving (rerun to
resume); 76 stopped by such a signal with nothing saved; 2 bad config or input; 1 a failure.
"""

from __future__ import annotations

import sys

from lockstep.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, EXIT_STOPPED, EXIT_STOPPED_UNSAVED
from lockstep.cli.arguments import MAX_PROCESSES_PER_MACHINE, Parser, integer
from lockstep.config import JobConfig, load_config, validate_job_config
from lockstep.config.job import run_folder
from lockstep.errors import LockstepError
from lockstep.train.resilience.comm import CollectiveFailure


def run(argv: list[str]) -> int:
    parser = Parser(
        prog="lockstep train",
        description="Train a model. Any other --section.key value pair overrides the config "
        "(e.g. --training.steps 10 --debug.deterministic).",
    )
    parser.add_argument("--config", help="a shipped config name (e.g. llama3_debug) or a TOML file path")
    parser.add_argument(
        "--nproc",
        type=integer(1, MAX_PROCESSES_PER_MACHINE),
        default=None,
        help="start N processes on this machine through torchrun (multi-node: torchrun)",
    )
    args, overrides = parser.parse_known_args(argv)
    if args.nproc is not None:
        from lockstep.cli.launch import check_nproc, launch_torchrun

        check_nproc(args.nproc)
        config = load_config(args.config, overrides)
        validate_job_config(config, args.nproc)  # fail here, before N processes start
        from lockstep.config.job import resolve_parallel_dims
        from lockstep.parallel.parallelize import check_model_fits_layout

        check_model_fits_layout(
            config.model, resolve_parallel_dims(config.parallelism, args.nproc), config.debug
        )  # overrides too
        from lockstep.run.lock import check_run_folder_free

        check_run_folder_free(run_folder(config))  # rank 0 takes the lock itself once started
        return launch_torchrun(args.nproc, argv)
    try:
        return _train(load_config(args.config, overrides))
    except CollectiveFailure as error:  # a peer hung or died: one line, not a traceback (exit 1)
        print(f"lockstep train: error: {error}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    except LockstepError as error:
        from lockstep.cli.launch import record_worker_error

        if record_worker_error(error):  # a worker of `lockstep train --nproc`: the launcher prints it
            return EXIT_BAD_INPUT
        raise


def _train(config: JobConfig) -> int:
    import torch

    from lockstep.train.runtime import resolve_device
    from lockstep.train.trainer import Trainer

    device = resolve_device(config.training)
    if device.type == "cuda" and not config.training.skip_memory_check:
        from lockstep.parallel.process_group import world_from_env
        from lockstep.tools.estimate.preflight import refuse_layouts_that_cannot_fit, this_device

        refuse_layouts_that_cannot_fit(config, world_from_env().world_size, this_device(device.index or 0))
    trainer = Trainer(config)
    if config.debug.print_config:
        from lockstep.config import dump_toml

        print(dump_toml(trainer.config))
    with trainer:
        run_folder = trainer.train()
        if trainer.world.is_main:
            print(f"run folder: {run_folder.resolve()}", flush=True)
        if trainer.stopped_by_signal and trainer.world.world_size > 1:
            # Leave together: torchrun stops the other workers as soon as one exits non-zero (75).
            torch.distributed.barrier()
    if not trainer.stopped_by_signal:
        return EXIT_OK
    return EXIT_STOPPED if trainer.stop_saved else EXIT_STOPPED_UNSAVED
