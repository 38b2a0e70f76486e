"""What `--debug.deterministic` costs per parallel layout: the steady-state step time of each layout with
it (deterministic algorithms plus the layout-invariant, canonical-tree reductions it requires) against
the same layout with `--debug.no-layout-invariant-reductions` (deterministic off, plain reductions).

Layouts (CPU/gloo, one thread per rank, seq 128, local batch 2; sized so a step takes ~0.1-0.4 s here):
  DDP 3        llama3_debug, --nproc 3, dp_replicate 3, global batch 6 (one microbatch per replica)
  bf16 FSDP 2  llama3_debug, --nproc 2, dp_shard 2, --training.mixed_precision bf16, global batch 4
  TP 2         llama3_debug, --nproc 2, tensor_parallel 2, global batch 2 (TP ranks share their batch)
  EP 2         deepseek_v3_debug, --nproc 2, expert_parallel 2 (on the dp_shard axis), global batch 4

Each run is `lockstep train --nproc N ...` with `--metrics.log_freq 1`; a step's time is the elapsed_s
difference of consecutive records of metrics.jsonl, the first --skip steps dropped. Per layout the two
modes run --repeats times interleaved (det, off, det, off, ...), so load from other jobs on a shared box
falls on both; a mode's figure is the median of its pooled step times, with the spread given as the
per-run medians and the pooled quartiles, and the overhead also per (det, off) pair. Since wall time on a
loaded box mostly measures the load, each run also samples the CPU seconds (user + system) of its whole
process tree from /proc at the records of step --skip and of the last step but one: CPU seconds per
step summed over the ranks, which other jobs cannot preempt (gloo waits block, they do not spin). The
runs' losses are kept too: the det runs of a layout should repeat bitwise.

    .venv/bin/python benchmarks/determinism_cost.py [--steps 20] [--skip 5] [--repeats 4]
        [--only "DDP 3" "TP 2"] [--modes det off [canonical]] [--out benchmarks/results/determinism_cost.json]

`--modes canonical` adds a third mode, the default settings (canonical reductions on, deterministic
algorithms off), to split the cost between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
ENV = os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}

LAYOUTS: dict[str, dict] = {
    "DDP 3": {
        "config": "llama3_debug", "nproc": 3, "global_batch": 6,
        "flags": ["--parallelism.data_parallel_replicate_degree", "3"],
    },
    "bf16 FSDP 2": {
        "config": "llama3_debug", "nproc": 2, "global_batch": 4,
        "flags": ["--parallelism.data_parallel_shard_degree", "2", "--training.mixed_precision", "bf16"],
    },
    "TP 2": {
        "config": "llama3_debug", "nproc": 2, "global_batch": 2,
        "flags": ["--parallelism.tensor_parallel_degree", "2"],
    },
    "EP 2": {
        "config": "deepseek_v3_debug", "nproc": 2, "global_batch": 4,
        "flags": ["--parallelism.expert_parallel_degree", "2"],
    },
}  # fmt: skip
MODES = {
    "det": ["--debug.deterministic"],
    "off": ["--debug.no-layout-invariant-reductions", "--debug.no-deterministic"],
    "canonical": ["--debug.layout-invariant-reductions", "--debug.no-deterministic"],
}


def run(layout: dict, mode: str, args, folder: Path) -> dict:
    """One `lockstep train --nproc N` run. Besides the step times from metrics.jsonl, the CPU seconds
    (user + system) of the whole process tree are sampled when the record of step --skip appears and when
    that of the last step but one does (every rank is still alive then): their difference over the steps
    between is CPU seconds per step, summed over the ranks, which another job's load on a shared box
    changes far less than the wall time (it cannot preempt it, only slow it through shared caches)."""
    command = [
        sys.executable, "-m", "lockstep", "train", "--nproc", str(layout["nproc"]),
        "--config", layout["config"], "--model.flavor", "debug", "--training.device", "cpu",
        "--training.seq_len", str(args.seq_len), "--training.local_batch_size", str(args.local_batch),
        "--training.global_batch_size", str(layout["global_batch"]), "--training.steps", str(args.steps),
        "--metrics.log_freq", "1", "--job.dump_folder", str(folder), *layout["flags"], *MODES[mode],
    ]  # fmt: skip
    metrics = folder / "metrics.jsonl"
    started = time.monotonic()
    with open(folder.parent / f"{folder.name}.log", "w") as log:
        process = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    first, last = args.skip, args.steps - 1
    cpu: dict[int, float] = {}
    while process.poll() is None:
        logged = _logged_steps(metrics)
        for step in (first, last):
            if step not in cpu and step in logged:
                cpu[step] = _tree_cpu_seconds(process.pid)
        time.sleep(0.005)
    wall = time.monotonic() - started
    output = (folder.parent / f"{folder.name}.log").read_text()
    if process.returncode != 0:
        raise RuntimeError(f"exit {process.returncode}: {' '.join(command)}\n{output[-4000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in records if "loss" in r}
    times = [
        by_step[s]["elapsed_s"] - by_step[s - 1]["elapsed_s"]
        for s in sorted(by_step)
        if s > args.skip and s - 1 in by_step
    ]
    cpu_per_step = (cpu[last] - cpu[first]) / (last - first) if first in cpu and last in cpu else None
    return {
        "mode": mode,
        "wall_s": wall,
        "step_s": times,
        "median_step_s": statistics.median(times),
        "cpu_s_per_step": cpu_per_step,
        "losses": [by_step[s]["loss"] for s in sorted(by_step)],
        "load_average": os.getloadavg(),
    }


def _logged_steps(metrics: Path) -> set[int]:
    if not metrics.exists():
        return set()
    steps = set()
    for line in metrics.read_text().splitlines():
        try:
            steps.add(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line still being written
    return steps


def _tree_cpu_seconds(root: int) -> float:
    """utime + stime of `root` and all its descendants (from /proc), in seconds."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid, ppid = int(entry.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        times[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def measure(name: str, layout: dict, args, work: Path) -> dict:
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    for repeat in range(args.repeats):
        for mode in args.modes:  # interleaved: det, off, det, off, ...
            result = run(layout, mode, args, work / f"{name.replace(' ', '_')}-{mode}-{repeat}")
            runs[mode].append(result)
            print(
                f"  {name:<12} {mode:<9} run {repeat}: median {1000 * result['median_step_s']:.1f} ms/step "
                f"({len(result['step_s'])} steps), {_ms(result['cpu_s_per_step'])} CPU ms/step (all ranks), "
                f"{result['wall_s']:.0f} s wall, load {result['load_average'][0]:.2f}",
                flush=True,
            )
    summary: dict = {"layout": name, **{k: v for k, v in layout.items()}, "modes": {}}
    for mode, mode_runs in runs.items():
        pooled = [t for r in mode_runs for t in r["step_s"]]
        low, high = quartiles(pooled)
        summary["modes"][mode] = {
            "median_step_s": statistics.median(pooled),
            "q1_step_s": low,
            "q3_step_s": high,
            "min_step_s": min(pooled),
            "max_step_s": max(pooled),
            "median_step_s_per_run": [r["median_step_s"] for r in mode_runs],
            "cpu_s_per_step_per_run": [r["cpu_s_per_step"] for r in mode_runs],
            "cpu_s_per_step": _median_or_none([r["cpu_s_per_step"] for r in mode_runs]),
            "losses_repeat_bitwise": all(r["losses"] == mode_runs[0]["losses"] for r in mode_runs),
            "final_loss": mode_runs[0]["losses"][-1],
            "runs": mode_runs,
        }
    if "det" in runs and "off" in runs:
        det, off = summary["modes"]["det"], summary["modes"]["off"]
        summary["overhead_percent"] = 100 * (det["median_step_s"] / off["median_step_s"] - 1)
        summary["overhead_percent_per_pair"] = [
            100 * (d["median_step_s"] / o["median_step_s"] - 1) for d, o in zip(runs["det"], runs["off"], strict=True)
        ]
        if det["cpu_s_per_step"] and off["cpu_s_per_step"]:
            summary["cpu_overhead_percent"] = 100 * (det["cpu_s_per_step"] / off["cpu_s_per_step"] - 1)
            summary["cpu_overhead_percent_per_pair"] = [
                100 * (d["cpu_s_per_step"] / o["cpu_s_per_step"] - 1)
                for d, o in zip(runs["det"], runs["off"], strict=True)
                if d["cpu_s_per_step"] and o["cpu_s_per_step"]
            ]
        summary["det_equals_off_losses"] = runs["det"][0]["losses"] == runs["off"][0]["losses"]
        summary["max_abs_loss_difference_det_vs_off"] = max(
            abs(a - b) for a, b in zip(runs["det"][0]["losses"], runs["off"][0]["losses"], strict=True)
        )
    if "canonical" in runs and "off" in runs:
        canonical, off = summary["modes"]["canonical"], summary["modes"]["off"]
        summary["canonical_overhead_percent"] = 100 * (canonical["median_step_s"] / off["median_step_s"] - 1)
        if canonical["cpu_s_per_step"] and off["cpu_s_per_step"]:
            summary["canonical_cpu_overhead_percent"] = 100 * (canonical["cpu_s_per_step"] / off["cpu_s_per_step"] - 1)
    return summary


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.0f}"


def _median_or_none(values: list) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the step times")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each mode per layout, interleaved")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--local-batch", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=[], help=f"layouts to run (default: all of {list(LAYOUTS)})")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["det", "off"])
    parser.add_argument("--out", type=Path, default=RESULTS / "determinism_cost.json")
    args = parser.parse_args()
    unknown = [name for name in args.only if name not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}")
    layouts = {k: v for k, v in LAYOUTS.items() if not args.only or k in args.only}
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="lockstep-det-cost-") as work:
        for name, layout in layouts.items():
            print(f"{name}: {args.repeats} x {args.modes}, {args.steps} steps each", flush=True)
            results.append(measure(name, layout, args, Path(work)))
    print()
    print(
        f"wall: steady-state step time, median of the pooled steps after the first {args.skip} [q1-q3]; "
        "CPU: CPU ms per step summed over the ranks, median of the runs; overheads det / off - 1, then per pair"
    )
    header = (
        f"{'layout':<12} | {'det wall ms':>17} | {'off wall ms':>17} | {'wall ovh':>8} | {'per pair':<22} | "
        f"{'det CPU':>7} | {'off CPU':>7} | {'CPU ovh':>7} | {'per pair':<22} | det bitwise"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "overhead_percent" not in r:
            continue
        det, off = r["modes"]["det"], r["modes"]["off"]

        def cell(m: dict) -> str:
            return f"{1000 * m['median_step_s']:.0f} [{1000 * m['q1_step_s']:.0f}-{1000 * m['q3_step_s']:.0f}]"

        def pairs(values: list[float]) -> str:
            return ", ".join(f"{v:+.0f}" for v in values)

        cpu = f"{r['cpu_overhead_percent']:+6.1f}%" if "cpu_overhead_percent" in r else "    n/a"
        print(
            f"{r['layout']:<12} | {cell(det):>17} | {cell(off):>17} | {r['overhead_percent']:+7.1f}% | "
            f"{pairs(r['overhead_percent_per_pair']):<22} | {_ms(det['cpu_s_per_step']):>7} | "
            f"{_ms(off['cpu_s_per_step']):>7} | {cpu} | {pairs(r.get('cpu_overhead_percent_per_pair', [])):<22} | "
            f"{det['losses_repeat_bitwise']}"
        )
    for r in results:
        if "canonical_overhead_percent" in r:
            cpu = r.get("canonical_cpu_overhead_percent")
            print(
                f"{r['layout']}: canonical reductions with deterministic off (--modes canonical) against off: wall "
                f"{r['canonical_overhead_percent']:+.1f}%, CPU " + ("n/a" if cpu is None else f"{cpu:+.1f}%")
            )
    report = {
        "command": " ".join(sys.argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu_count": os.cpu_count(),
        "results": results,
        "wall_s": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
