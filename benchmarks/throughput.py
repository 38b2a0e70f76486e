"""Tokens/s, MFU and peak RSS of llama3_debug (batch 8) at several sequence lengths, or of several
model families' debug presets side by side (--configs).

Each setting runs `python -m lockstep.train` in its own process (so peak RSS is its own) and reads
the run's metrics.jsonl; the first logged interval (warm-up) is dropped. MFU is against the
measured fp32 matmul peak of this machine, printed too.

    .venv/bin/python benchmarks/throughput.py [--seq-lens 256 512 2048] [--steps 30] [--threads 2]
    .venv/bin/python benchmarks/throughput.py --configs llama3_debug deepseek_v3_debug qwen3_debug \
        qwen3_moe_debug --seq-lens 256 --name families
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lockstep.train.observe.throughput import mfu_percent

RESULTS = Path(__file__).parent / "results"


def run_one(
    seq_len: int,
    batch: int,
    steps: int,
    threads: int,
    extra: list[str],
    peak: float,
    nproc: int = 1,
    config: str = "llama3_debug",
) -> dict:
    """One training run; nproc > 1 launches torchrun with that many ranks (threads each). `peak` is the
    matmul peak of one process with `threads` threads, so MFU is measured against nproc times it."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(nproc)]
    with tempfile.TemporaryDirectory() as folder:
        command = [
            *launcher, "-m", "lockstep.train", "--config", config,
            "--training.seq_len", str(seq_len), "--training.local_batch_size", str(batch),
            "--training.steps", str(steps), "--metrics.log_freq", "5", "--job.dump_folder", folder,
            "--training.device", "cpu", *extra,
        ]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in open(Path(folder) / "metrics.jsonl")]
    steady = [r for r in records if r["step"] > 5]
    tflops = statistics.mean(r["tflops"] for r in steady)
    return {
        "config": config,
        "seq_len": seq_len,
        "batch": batch,
        "tokens_per_sec": statistics.mean(r["tokens_per_sec"] for r in steady),
        "tflops": tflops,
        "mfu_percent": mfu_percent(tflops, peak, nproc),  # peak: one process's; nproc of them ran
        "trainer_mfu_percent": statistics.mean(r["mfu"] for r in steady),
        "peak_rss_gib": records[-1]["memory_gib"],
        "final_loss": records[-1]["loss"],
    }


def matmul_peak(threads: int) -> float:
    code = "import torch; from lockstep.train.observe.throughput import measure_cpu_matmul_peak as m; print(m(seconds=2.0))"
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    return float(
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 2048])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="throughput")
    parser.add_argument(
        "--configs", nargs="+", default=["llama3_debug"], help="presets to measure, each at every seq len"
    )
    parser.add_argument("extra", nargs="*", help="extra --section.key value overrides, after --")
    args = parser.parse_args()
    peak = matmul_peak(args.threads)
    print("MFU below: against the CPU matmul peak measured here; on a GPU read trainer_mfu_percent in the JSON")
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({args.threads} threads, {platform.processor()})")
    results = []
    for config in args.configs:
        for seq_len in args.seq_lens:
            result = run_one(seq_len, args.batch, args.steps, args.threads, args.extra, peak, config=config)
            results.append(result)
            print(
                f"{config:<18} seq {seq_len:>5}  batch {args.batch}  {result['tokens_per_sec']:>8,.0f} tok/s  "
                f"MFU {result['mfu_percent']:5.1f}%  peak RSS {result['peak_rss_gib']:.2f} GiB"
            )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps({"matmul_peak_flops": peak, "threads": args.threads, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
