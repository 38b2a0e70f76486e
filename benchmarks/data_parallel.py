"""Tokens/s of llama3_debug at one process, FSDP (dp_shard) 2, DDP (replicate) 2, HSDP 2x2 and PP 2,
one thread per rank, with the layout-invariant (canonical tree) reductions and with the plain ones,
to price them.

    .venv/bin/python benchmarks/data_parallel.py [--steps 30] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json

from throughput import RESULTS, matmul_peak, run_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--local-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--only", nargs="*", default=[], help="layout names to run (default: all)")
    args = parser.parse_args()
    peak = matmul_peak(1)
    layouts = {
        "one process": (1, []),
        "dp_shard 2 (FSDP)": (2, ["--parallelism.data_parallel_shard_degree", "2"]),
        "dp_replicate 2 (DDP)": (2, ["--parallelism.data_parallel_replicate_degree", "2"]),
        "HSDP 2x2": (4, ["--parallelism.data_parallel_replicate_degree", "2"]),
        "pp 2 (1F1B)": (2, ["--parallelism.pipeline_parallel_degree", "2"]),
    }
    layouts = {k: v for k, v in layouts.items() if not args.only or k in args.only}
    rows = []
    for layout, (nproc, flags) in layouts.items():
        for invariant in (True, False):
            extra = [
                "--training.global_batch_size", str(args.global_batch), *flags,
                "--debug.layout-invariant-reductions" if invariant else "--debug.no-layout-invariant-reductions",
            ]  # fmt: skip
            result = run_one(args.seq_len, args.local_batch, args.steps, 1, extra, peak, nproc=nproc)
            rows.append({"layout": layout, "layout_invariant": invariant, **result})
            kind = "canonical" if invariant else "plain    "
            print(f"{layout:<22} {kind} {result['tokens_per_sec']:>8,.0f} tok/s", flush=True)
    for layout in layouts:
        canonical, plain = (
            next(r for r in rows if r["layout"] == layout and r["layout_invariant"] is v) for v in (True, False)
        )
        cost = 100 * (1 - canonical["tokens_per_sec"] / plain["tokens_per_sec"])
        print(f"{layout}: layout-invariant reductions cost {cost:.1f}% of tokens/s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_parallel.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
