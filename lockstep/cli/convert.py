"""``lockstep convert to-hf|from-hf``: Hugging Face safetensors folders <-> lockstep checkpoints.

``from-hf --nproc N`` starts N processes through torchrun (lockstep.cli.launch); each reads and
writes only its shard of the model (lockstep.checkpoint.hf_import)."""

from __future__ import annotations

from pathlib import Path

from lockstep.cli import EXIT_BAD_INPUT
from lockstep.cli.arguments import MAX_PROCESSES_PER_MACHINE, Parser, integer


def run(argv: list[str]) -> int:
    parser = Parser(prog="lockstep convert", description="Hugging Face <-> lockstep checkpoints.")
    sub = parser.add_subparsers(dest="direction", required=True)
    to_hf = sub.add_parser("to-hf", help="a lockstep checkpoint (or run folder) -> safetensors + config.json")
    to_hf.add_argument("source", type=Path)
    to_hf.add_argument("out_dir", type=Path)
    to_hf.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    to_hf.add_argument(
        "--tokenizer-path",
        type=Path,
        default=None,
        help="a tokenizer.json (or its folder) to export instead of the run's own",
    )
    to_hf.add_argument(
        "--max-shard-bytes",
        type=integer(1),
        default=5 << 30,
        help="largest safetensors file; about the memory it needs",
    )
    from_hf = sub.add_parser(
        "from-hf",
        help="a Hugging Face folder -> a model-only lockstep checkpoint (step 0) in a new or empty folder; "
        "with --nproc N each of N processes reads and writes 1/N of the model",
    )
    from_hf.add_argument("hf_dir", type=Path)
    from_hf.add_argument("out_dir", type=Path)
    from_hf.add_argument(
        "--model", default=None, help="model family of the weights (default: from config.json's model_type)"
    )
    from_hf.add_argument(
        "--nproc",
        type=integer(1, MAX_PROCESSES_PER_MACHINE),
        default=1,
        help="processes on this machine (torchrun); memory per process ~ model / N",
    )
    args = parser.parse_args(argv)
    from lockstep.checkpoint.hf import export_to_hf
    from lockstep.checkpoint.hf_import import check_import

    try:
        if args.direction == "to-hf":
            timings = export_to_hf(
                args.source, args.out_dir, args.dtype, args.max_shard_bytes, tokenizer_path=args.tokenizer_path
            )
        elif args.nproc != 1:
            from lockstep.cli.launch import check_nproc, launch_torchrun

            check_nproc(args.nproc)
            check_import(args.hf_dir, args.out_dir, args.model)  # refused here, before N processes start
            return launch_torchrun(args.nproc, argv, command="convert")
        else:
            timings = _from_hf(args.hf_dir, args.out_dir, args.model)
            if timings is None:  # not rank 0
                return 0
    except (FileNotFoundError, ValueError, KeyError) as e:  # a folder that is not what it claims to be
        from lockstep.cli import report
        from lockstep.cli.launch import record_worker_error
        from lockstep.errors import LockstepError

        if record_worker_error(e if isinstance(e, LockstepError) else LockstepError(str(e))):
            return EXIT_BAD_INPUT  # a worker of `--nproc N`: the launcher prints the one line
        return report("convert", e)
    print(f"wrote {args.out_dir}  " + "  ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return 0


def _from_hf(hf_dir: Path, out_dir: Path, model: str | None) -> dict | None:
    """One process, or one rank of a torchrun launch (it joins the group, on the CPU: the weights go
    from disk to disk); returns the timings on rank 0, None on the others."""
    import torch

    from lockstep.checkpoint.hf_import import import_from_hf
    from lockstep.parallel.process_group import destroy_process_group, init_process_group, world_from_env

    world = world_from_env()
    init_process_group(world, torch.device("cpu"))
    done = False
    try:
        timings = import_from_hf(hf_dir, out_dir, model)
        done = True
    finally:
        destroy_process_group(barrier=done)
    return timings if world.is_main else None
