"""The DeepSeek-V3 debug model: tokens/s at EP=1 (one process), FSDP 2 and EP=2 (2 ranks x 1 thread),
and the share of EP=2 step time spent in the token dispatch/combine all-to-alls (torch.profiler).

    .venv/bin/python benchmarks/moe.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import RESULTS, matmul_peak, run_one

MOE = ["--model.name", "deepseek_v3", "--model.flavor", "debug", "--training.global_batch_size", "16"]


def profile_rank(steps: int) -> None:
    """Under torchrun: train a few steps with EP 2, then profile `steps` steps; rank 0 prints JSON."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lockstep.config import load_config
    from lockstep.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as folder:
        overrides = [*MOE, "--parallelism.expert_parallel_degree", "2", "--training.seq_len", "256",
                     "--training.local_batch_size", "4", "--training.steps", str(steps + 3),
                     "--job.dump_folder", f"{folder}/run", "--training.device", "cpu"]  # fmt: skip
        with Trainer(load_config("llama3_debug", overrides), show_progress=False) as trainer:
            for _ in range(3):
                trainer.state.advance(trainer.train_step().samples * 256)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                started = time.perf_counter()
                for _ in range(steps):
                    trainer.state.advance(trainer.train_step().samples * 256)
                wall = time.perf_counter() - started
            # The token all-to-alls, forward and backward (wall time on this thread, waiting included).
            all_to_all_us = sum(
                e.cpu_time_total for e in prof.key_averages() if e.key in ("_AlltoAllSingle", "_AlltoAllSingleBackward")
            )
            if torch.distributed.get_rank() == 0:
                print(json.dumps({"wall_s": wall, "all_to_all_s": all_to_all_us / 1e6}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--profile-rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_rank:
        profile_rank(10)
        return

    peak = matmul_peak(1)
    rows = []
    for name, nproc, extra in [
        ("EP 1 (one process)", 1, []),
        ("FSDP 2, experts sharded with the rest", 2, []),
        ("EP 2", 2, ["--parallelism.expert_parallel_degree", "2"]),
    ]:
        result = run_one(256, 4, args.steps, 1, MOE + extra, peak, nproc=nproc)
        rows.append({"layout": name, **result})
        print(f"{name:<40} {result['tokens_per_sec']:>8,.0f} tok/s  loss {result['final_loss']:.4f}", flush=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*torchrun, __file__, "--profile-rank"], capture_output=True, text=True, check=True,
        env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)},
    )  # fmt: skip
    profile = json.loads(done.stdout.strip().splitlines()[-1])
    share = 100 * profile["all_to_all_s"] / profile["wall_s"]
    print(f"EP 2: dispatch/combine all-to-alls take {share:.1f}% of step time (rank 0, 10 steps profiled)")
    rows.append({"layout": "EP 2 profile", **profile, "all_to_all_share_percent": share})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
