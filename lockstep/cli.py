"""The ``lockstep`` command: ``lockstep train --config NAME_OR_PATH [--section.key value ...]``,
``lockstep convert to-hf|from-hf ...`` and ``lockstep config-reference``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def _convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lockstep convert", description="Hugging Face <-> lockstep checkpoints.")
    sub = parser.add_subparsers(dest="direction", required=True)
    to_hf = sub.add_parser("to-hf", help="a lockstep checkpoint (or run folder) -> safetensors + config.json")
    to_hf.add_argument("source", type=Path)
    to_hf.add_argument("out_dir", type=Path)
    to_hf.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    from_hf = sub.add_parser("from-hf", help="a Hugging Face folder -> a model-only lockstep checkpoint (step 0)")
    from_hf.add_argument("hf_dir", type=Path)
    from_hf.add_argument("out_dir", type=Path)
    from_hf.add_argument("--model", default="llama3", help="model family of the weights")
    args = parser.parse_args(argv)
    from lockstep.checkpoint.hf import export_to_hf, import_from_hf

    try:
        if args.direction == "to-hf":
            timings = export_to_hf(args.source, args.out_dir, args.dtype)
        else:
            timings = import_from_hf(args.hf_dir, args.out_dir, args.model)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"lockstep convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}  " + "  ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return 0


COMMANDS = {"train": _train, "convert": _convert, "config-reference": _config_reference}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: lockstep {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
