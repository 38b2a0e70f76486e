"""bf16 against fp32: a 300-step convergence check on one process, and bf16 bitwise across layouts.

convergence: llama3_debug on the built-in corpus, `--debug.deterministic`, seed 42, seq 128, local batch 2,
global batch 4 (two microbatches per step), --steps steps (300), logged every step, once with
`--training.mixed_precision fp32` and once with `bf16` (FSDP2's mixed-precision policy over a one-rank
mesh: bf16 parameters and activations, fp32 gradient sums, fp32 master weights and AdamW state). Reported:
the final loss of each, the relative loss difference |bf16 - fp32| / fp32 per step (max and mean over all
steps), and over the last 50 steps the mean signed (bf16 - fp32) and absolute difference and each run's mean
loss. The two runs go side by side (one thread each); no time is measured, and deterministic runs do not
depend on the timing.

bitwise: bf16 for --check-steps steps (20) on one process against `lockstep train --nproc 2` FSDP 2
(dp_shard 2), the same global batch (4) and microbatch size (2), with `--debug.fingerprint`: loss, grad
norm and the parameter and gradient hashes must be equal at every step.

Figures print; JSON (and, unless --no-plot, a PNG of both loss curves and their relative difference) go
under benchmarks/results/.

    .venv/bin/python benchmarks/bf16_accuracy.py [--steps 300] [--seq-len 128] [--local-batch 2]
        [--global-batch 4] [--check-steps 20] [--out benchmarks/results/bf16_accuracy.json] [--no-plot]
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
COMPARED = ("loss", "grad_norm", "param_fingerprint", "grad_fingerprint")


def command(args, folder: Path, steps: int, precision: str, *extra: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "lockstep", "train"] + (["--nproc", str(nproc)] if nproc > 1 else [])
    return [
        *launcher, "--config", "llama3_debug", "--training.device", "cpu", "--debug.deterministic",
        "--debug.seed", str(args.seed), "--training.seq_len", str(args.seq_len),
        "--training.local_batch_size", str(args.local_batch), "--training.global_batch_size", str(args.global_batch),
        "--training.steps", str(steps), "--training.mixed_precision", precision, "--metrics.log_freq", "1",
        "--job.dump_folder", str(folder), *extra,
    ]  # fmt: skip


def run_together(commands: dict[str, list[str]], work: Path) -> dict[str, list[dict]]:
    """Start every command at once, wait for all; the step records of each run's metrics.jsonl."""
    processes = {}
    for name, cmd in commands.items():
        with open(work / f"{name}.log", "w") as log:
            processes[name] = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    failed = {name: p.wait() for name, p in processes.items()}
    failed = {name: code for name, code in failed.items() if code != 0}
    if failed:
        logs = "\n".join(f"--- {n} (exit {c}):\n{(work / f'{n}.log').read_text()[-3000:]}" for n, c in failed.items())
        raise RuntimeError(f"runs failed: {failed}\n{logs}")
    found = {}
    for name, cmd in commands.items():
        folder = Path(cmd[cmd.index("--job.dump_folder") + 1])
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        found[name] = [r for r in map(json.loads, filter(str.strip, lines)) if "loss" in r]
    return found


def convergence(args, work: Path) -> dict:
    started = time.monotonic()
    runs = run_together({p: command(args, work / p, args.steps, p) for p in ("fp32", "bf16")}, work)
    wall = time.monotonic() - started
    fp32, bf16 = ({r["step"]: r for r in runs[p]} for p in ("fp32", "bf16"))
    steps = sorted(fp32)
    if steps != sorted(bf16) or steps != list(range(1, args.steps + 1)):
        raise RuntimeError(f"logged steps differ: fp32 {steps[:3]}..{steps[-3:]}, bf16 {sorted(bf16)[-3:]}")
    difference = [bf16[s]["loss"] - fp32[s]["loss"] for s in steps]
    relative = [abs(d) / fp32[s]["loss"] for d, s in zip(difference, steps, strict=True)]
    last = steps[-50:]
    tail = difference[-50:]
    return {
        "wall_s_both_side_by_side": wall,
        "final_loss_fp32": fp32[steps[-1]]["loss"],
        "final_loss_bf16": bf16[steps[-1]]["loss"],
        "max_relative_difference": max(relative),
        "max_relative_difference_step": steps[relative.index(max(relative))],
        "mean_relative_difference": statistics.mean(relative),
        "last_50_mean_difference_bf16_minus_fp32": statistics.mean(tail),
        "last_50_mean_abs_difference": statistics.mean(abs(d) for d in tail),
        "last_50_mean_relative_difference": statistics.mean(relative[-50:]),
        "last_50_mean_loss_fp32": statistics.mean(fp32[s]["loss"] for s in last),
        "last_50_mean_loss_bf16": statistics.mean(bf16[s]["loss"] for s in last),
        "steps_bf16_lower": sum(d < 0 for d in difference),
        "loss_fp32": [fp32[s]["loss"] for s in steps],
        "loss_bf16": [bf16[s]["loss"] for s in steps],
        "grad_norm_fp32": [fp32[s]["grad_norm"] for s in steps],
        "grad_norm_bf16": [bf16[s]["grad_norm"] for s in steps],
        "step_s_median_fp32": _median_step(runs["fp32"]),
        "step_s_median_bf16": _median_step(runs["bf16"]),
    }


def _median_step(records: list[dict]) -> float:
    """Indicative only: the two runs shared the CPU with each other (and whatever else ran)."""
    return statistics.median(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(records[5:], records[6:], strict=False))


def bitwise(args, work: Path) -> dict:
    fingerprint = "--debug.fingerprint"
    fsdp = ["--parallelism.data_parallel_shard_degree", "2"]
    commands = {
        "bf16_1_process": command(args, work / "one", args.check_steps, "bf16", fingerprint),
        "bf16_fsdp_2": command(args, work / "fsdp2", args.check_steps, "bf16", fingerprint, *fsdp, nproc=2),
    }
    runs = run_together(commands, work)
    one, two = ({r["step"]: r for r in runs[n]} for n in commands)
    steps = sorted(one)
    mismatched = {key: [s for s in steps if s not in two or one[s].get(key) != two[s].get(key)] for key in COMPARED}
    missing = [k for k in COMPARED if any(k not in one[s] for s in steps)]
    return {
        "steps": steps,
        "fsdp_2_steps": sorted(two),
        "fields_compared": list(COMPARED),
        "fields_missing": missing,
        "mismatched_steps": mismatched,
        "bitwise_equal": sorted(one) == sorted(two) and not missing and not any(mismatched.values()),
        "max_abs_loss_difference": max(abs(one[s]["loss"] - two[s]["loss"]) for s in steps if s in two),
        "commands": {n: " ".join(c[1:]) for n, c in commands.items()},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["convergence"]
    steps = range(1, len(c["loss_fp32"]) + 1)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    top.plot(steps, c["loss_fp32"], label="fp32", color="C0", lw=1)
    top.plot(steps, c["loss_bf16"], label="bf16 (FSDP2 mixed precision)", color="C1", lw=1, alpha=0.8)
    top.set_ylabel("training loss (nats/token)")
    top.legend()
    top.grid(alpha=0.3)
    s = result["settings"]
    top.set_title(
        f"llama3_debug, seq {s['seq_len']} x global batch {s['global_batch']}, seed {s['seed']}, deterministic, 1 process"
    )
    relative = [(b - a) / a for a, b in zip(c["loss_fp32"], c["loss_bf16"], strict=True)]
    bottom.plot(steps, [100 * r for r in relative], color="C2", lw=1)
    bottom.axhline(0, color="grey", lw=0.5)
    bottom.set_ylabel("(bf16 - fp32) / fp32, %")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--local-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--check-steps", type=int, default=20, help="steps of the 1 process vs FSDP 2 bf16 check")
    parser.add_argument("--out", type=Path, default=RESULTS / "bf16_accuracy.json")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    report: dict = {
        "command": " ".join(sys.argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="lockstep-bf16-") as folder:
        work = Path(folder)
        report["convergence"] = c = convergence(args, work)
        print(
            f"{args.steps} steps, seq {args.seq_len}, global batch {args.global_batch}, deterministic, seed {args.seed}"
        )
        print(f"final loss: fp32 {c['final_loss_fp32']:.4f}, bf16 {c['final_loss_bf16']:.4f}")
        print(
            f"|bf16 - fp32| / fp32 over all steps: max {100 * c['max_relative_difference']:.3f}% "
            f"(step {c['max_relative_difference_step']}), mean {100 * c['mean_relative_difference']:.3f}%"
        )
        print(
            f"last 50 steps: mean (bf16 - fp32) {c['last_50_mean_difference_bf16_minus_fp32']:+.5f}, mean |bf16 - fp32| "
            f"{c['last_50_mean_abs_difference']:.5f} ({100 * c['last_50_mean_relative_difference']:.3f}%); mean loss "
            f"fp32 {c['last_50_mean_loss_fp32']:.4f}, bf16 {c['last_50_mean_loss_bf16']:.4f}; bf16 lower on "
            f"{c['steps_bf16_lower']} of {args.steps} steps"
        )
        report["bitwise"] = b = bitwise(args, work)
        verdict = "bitwise equal" if b["bitwise_equal"] else "NOT bitwise equal"
        print(
            f"bf16, {args.check_steps} steps, 1 process vs FSDP 2 (global batch {args.global_batch}, microbatch "
            f"{args.local_batch}): {verdict} in {', '.join(COMPARED)}"
            + (
                ""
                if b["bitwise_equal"]
                else f"; mismatched steps {b['mismatched_steps']}, missing {b['fields_missing']}"
            )
        )
    report["wall_s"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    if not args.no_plot:
        plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
