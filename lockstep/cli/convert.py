"""``lockstep convert to-hf|from-hf``: Hugging Face safetensors folders <-> lockstep checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lockstep convert", description="Hugging Face <-> lockstep checkpoints.")
    sub = parser.add_subparsers(dest="direction", required=True)
    to_hf = sub.add_parser("to-hf", help="a lockstep checkpoint (or run folder) -> safetensors + config.json")
    to_hf.add_argument("source", type=Path)
    to_hf.add_argument("out_dir", type=Path)
    to_hf.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    to_hf.add_argument(
        "--max-shard-bytes", type=int, default=5 << 30, help="largest safetensors file; about the memory it needs"
    )
    from_hf = sub.add_parser(
        "from-hf",
        help="a Hugging Face folder -> a model-only lockstep checkpoint (step 0), in one process holding the "
        "model; for one that fits no host, give the folder to --checkpoint.initial_load_path (sharded reads)",
    )
    from_hf.add_argument("hf_dir", type=Path)
    from_hf.add_argument("out_dir", type=Path)
    from_hf.add_argument("--model", default="llama3", help="model family of the weights")
    args = parser.parse_args(argv)
    from lockstep.checkpoint.hf import export_to_hf, import_from_hf

    try:
        if args.direction == "to-hf":
            timings = export_to_hf(args.source, args.out_dir, args.dtype, args.max_shard_bytes)
        else:
            timings = import_from_hf(args.hf_dir, args.out_dir, args.model)
    except (FileNotFoundError, ValueError, KeyError) as e:  # a folder that is not what it claims to be
        from lockstep.cli import report

        return report("convert", e)
    print(f"wrote {args.out_dir}  " + "  ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return 0
