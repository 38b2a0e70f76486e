"""Tokens/s of llama3_debug at data-parallel degree 1 and 2 (replicate, one thread per rank), with
the layout-invariant (canonical tree) reductions and with the plain ones, to price them.

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
    args = parser.parse_args()
    peak = matmul_peak(1)
    rows = []
    for dp in (1, 2):
        for invariant in (True, False):
            extra = [
                "--training.global_batch_size", str(args.global_batch),
                "--parallelism.data_parallel_replicate_degree", str(dp),
                "--debug.layout-invariant-reductions" if invariant else "--debug.no-layout-invariant-reductions",
            ]  # fmt: skip
            result = run_one(args.seq_len, args.local_batch, args.steps, 1, extra, peak, nproc=dp)
            rows.append({"dp": dp, "layout_invariant": invariant, **result})
            print(f"dp {dp}  {'canonical' if invariant else 'plain    '}  {result['tokens_per_sec']:>8,.0f} tok/s")
    for dp in (1, 2):
        canonical, plain = (
            next(r for r in rows if r["dp"] == dp and r["layout_invariant"] is v) for v in (True, False)
        )
        cost = 100 * (1 - canonical["tokens_per_sec"] / plain["tokens_per_sec"])
        print(f"dp {dp}: layout-invariant reductions cost {cost:.1f}% of tokens/s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_parallel.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
