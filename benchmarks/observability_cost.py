"""What observability costs a training step: profiling enabled but between traced windows, loss-spike
detection, and the per-step bookkeeping every run now has (step metrics, the comm-timeout watch, the
profiler's step context). Target: under 1% of a step when nothing is being traced.

Two measurements:

1. End to end, in this process (one rank, CPU, llama3_debug, seq 128, local batch 2, one thread): for
   each mode a run of --steps steps with ``metrics.log_freq 1``; a step's time is ``step_time_s`` of its
   record (wall time of the step). The first --skip steps are dropped, and under profiling the steps of
   each traced window (warmup + active) too, since the target is the cost when nothing is traced.
   Modes run --repeats times interleaved (base, profiling, spikes, base, ...) so load on a shared box
   falls on all; a mode's figure is the median of its pooled step times.
     base       the defaults (profiling off, spike detection off)
     profiling  --profiling.enable_profiling, profile_freq 25, warmup 1, active 1 (traces at 25, 50, ...)
     spikes     --debug.spike_window 20 (log)
2. Micro: the per-step calls themselves (StepMetrics begin/compute_done/end, CommTimeouts.watching,
   Profiler.step with profiling off) and one StepMetrics.record() (what a logged step adds), timed over
   many calls, as a share of the base step time. End-to-end noise on this box (~±5%) hides anything
   under 1%; these bound it directly.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/observability_cost.py [--steps 60] [--skip 5] [--repeats 3]
        [--out benchmarks/results/observability_cost.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lockstep.config import load_config
from lockstep.config.sections import CommConfig, DebugConfig, ProfilingConfig
from lockstep.run.folder import read_metrics
from lockstep.train.guards.spikes import SpikeDetector
from lockstep.train.observe.profiling import Profiler
from lockstep.train.observe.step_metrics import StepMetrics
from lockstep.train.resilience.comm import CommTimeouts
from lockstep.train.trainer import Trainer

RESULTS = Path(__file__).parent / "results"
PROFILE_FREQ = 25
MODES = {
    "base": [],
    "profiling": [
        "--profiling.enable_profiling", "--profiling.profile_freq", str(PROFILE_FREQ),
        "--profiling.profiler_warmup", "1", "--profiling.profiler_active", "1",
    ],
    "spikes": ["--debug.spike_window", "20"],
}  # fmt: skip


def run(mode: str, args, folder: Path) -> list[float]:
    config = load_config("llama3_debug", [
        "--job.dump_folder", str(folder), "--training.device", "cpu", "--training.steps", str(args.steps),
        "--training.seq_len", "128", "--training.local_batch_size", "2", "--metrics.log_freq", "1",
        "--debug.seed", "7", *MODES[mode],
    ])  # fmt: skip
    with Trainer(config, show_progress=False) as trainer:
        trainer.train()
    traced = {s for s in range(1, args.steps + 1) if s % PROFILE_FREQ in (0, PROFILE_FREQ - 1)}
    return [
        r["step_time_s"]
        for r in read_metrics(folder)
        if r["step"] > args.skip and not (mode == "profiling" and r["step"] in traced)
    ]


def per_call_us(call, repeats: int) -> float:
    started = time.perf_counter()
    for i in range(repeats):
        call(i)
    return 1e6 * (time.perf_counter() - started) / repeats


def micro(work: Path) -> dict:
    device = torch.device("cpu")
    metrics = StepMetrics(device)
    comm = CommTimeouts(CommConfig(), work, 0)
    profiler = Profiler(ProfilingConfig(), run_folder=work, rank=0, device=device)

    def step_bookkeeping(i: int) -> None:
        with comm.watching(i), profiler.step(i):
            metrics.begin()
            metrics.compute_done()
            metrics.end(i)
        comm.step_done(i)

    found = {"per_step_us": per_call_us(step_bookkeeping, 20000)}
    # Profiling on, between traced windows (the window never comes: profile_freq is huge).
    untraced = ProfilingConfig(enable_profiling=True, profile_freq=10**9, profiler_warmup=0, profiler_active=1)
    traced_later = Profiler(untraced, run_folder=work, rank=0, device=device)
    traced_later.start(0)

    def profiled_step(i: int) -> None:
        with traced_later.step(i):
            pass

    found["profiler_between_traces_us"] = per_call_us(profiled_step, 20000)
    traced_later.stop()
    spikes = SpikeDetector(DebugConfig(spike_window=20), window=[], run_folder=work, writes=False)
    found["spike_check_us"] = per_call_us(lambda i: spikes.check(i, 2.0 + (i % 7) * 1e-3), 20000)
    found["record_us"] = per_call_us(lambda i: metrics.record(), 2000)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "observability_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lockstep-observability-"))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            found = run(mode, args, work / f"{mode}-{repeat}")
            times[mode] += found
            print(f"  {mode:<10} run {repeat}: median {1000 * statistics.median(found):.2f} ms/step", flush=True)
    base = statistics.median(times["base"])
    summary: dict = {"steps": args.steps, "skip": args.skip, "repeats": args.repeats, "modes": {}}
    for mode, pooled in times.items():
        median = statistics.median(pooled)
        summary["modes"][mode] = {
            "median_step_s": median, "steps_pooled": len(pooled), "overhead_percent": 100 * (median / base - 1),
        }  # fmt: skip
        print(f"{mode:<10} {1000 * median:8.2f} ms/step  {100 * (median / base - 1):+6.2f}% vs base")
    summary["micro"] = micro(work)
    for name, us in list(summary["micro"].items()):
        summary["micro"][name.replace("_us", "_percent_of_a_step")] = 100 * us / (1e6 * base)
        print(f"{name.replace('_us', ''):<28} {us:8.1f} us  {100 * us / (1e6 * base):.4f}% of a base step")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
