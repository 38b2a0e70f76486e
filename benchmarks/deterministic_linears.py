"""What debug.deterministic costs at real widths (issue 24): a 2-layer slice of the llama3 1B and 8B shapes
at seq 2048 (batch 1, fp32, the built-in 2048-token tokenizer), one process, one and two threads. Modes,
alternated step by step in one process so that load falls on all of them:

  plain          the default (canonical reductions, deterministic off)
  deterministic  --debug.deterministic (chunks = the TP degree, 1: plain linear layers)
  chunks 8       --debug.deterministic --debug.deterministic_chunks 8 (resumable and comparable up to TP 8:
                 every linear that TP splits sums 8 chunks in fp32)

One model at a time (three 8B slices with their AdamW state do not fit this box's 24 GiB): each mode is
built, warmed up by one step, then timed over --steps steps; its figure is the median, and the
overhead is against plain. Writes benchmarks/results/deterministic_linears.json.

    .venv/bin/python benchmarks/deterministic_linears.py [--shapes 1B 8B] [--threads 1 2] [--steps 3]
    .venv/bin/python benchmarks/deterministic_linears.py --selective-ac-peaks

The second form prints the step peak (torch's MemTracker) of llama3_debug in one process under selective
op activation checkpointing: plain, deterministic, and deterministic with 16 chunks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lockstep.config import load_config
from lockstep.config.job import resolve_parallel_dims
from lockstep.tools.estimate.measure import measure_rank
from lockstep.tools.estimate.rank_step import RankStep

MODES = {
    "plain": [],
    "deterministic": ["--debug.deterministic"],
    "chunks 8": ["--debug.deterministic", "--debug.deterministic_chunks", "8"],
}
RESULTS = Path(__file__).parent / "results" / "deterministic_linears.json"


def build(shape: str, mode: str, layers: int, seq_len: int) -> RankStep:
    overrides = [
        "--model.flavor", shape, "--model.overrides.n_layers", str(layers), "--training.seq_len", str(seq_len),
        "--training.local_batch_size", "1", "--training.global_batch_size", "1", *MODES[mode],
    ]  # fmt: skip
    config = load_config("llama3_debug", overrides)
    dims = resolve_parallel_dims(config.parallelism, 1)
    return RankStep(config, dims, vocab_size=2048, device=torch.device("cpu"), attention_backend="sdpa",
                    ranks_per_node=1)  # fmt: skip


def selective_ac_peaks() -> None:
    torch.set_num_threads(1)
    selective = ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"]
    for mode, flags in {**MODES, "chunks 16": ["--debug.deterministic", "--debug.deterministic_chunks", "16"]}.items():
        config = load_config("llama3_debug", [*selective, *flags])
        measured = measure_rank(config, resolve_parallel_dims(config.parallelism, 1), ranks_per_node=1, vocab_size=2048)
        print(f"llama3_debug, selective op AC, {mode}: peak {measured.peak_bytes / 2**30:.4f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1B", "8B"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--selective-ac-peaks", action="store_true")
    args = parser.parse_args()
    if args.selective_ac_peaks:
        selective_ac_peaks()
        return
    rows = []
    for shape in args.shapes:
        for threads in args.threads:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {}
            for mode in MODES:  # one model at a time: three 8B slices with AdamW state do not fit 24 GiB
                step = build(shape, mode, args.layers, args.seq_len)
                step.run()  # warm-up
                times[mode] = []
                for _ in range(args.steps):
                    started = time.perf_counter()
                    step.run()
                    times[mode].append(time.perf_counter() - started)
                del step
            medians = {mode: statistics.median(t) for mode, t in times.items()}
            row = {
                "shape": shape, "layers": args.layers, "seq_len": args.seq_len, "threads": threads,
                "median_step_s": medians, "step_s": times,
                "overhead_percent": {m: 100 * (medians[m] / medians["plain"] - 1) for m in MODES if m != "plain"},
            }  # fmt: skip
            rows.append(row)
            print(f"{shape} x{args.layers} seq {args.seq_len}, {threads} thread(s): "
                  + ", ".join(f"{m} {medians[m]:.2f} s" for m in MODES)
                  + " | " + ", ".join(f"{m} {v:+.1f}%" for m, v in row["overhead_percent"].items()), flush=True)  # fmt: skip
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
