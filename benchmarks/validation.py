"""In-loop validation: what one evaluation costs against training, and a convergence record.

cost: one process (1 thread by default) builds a llama3_debug Trainer (seq 256, local batch 8,
validation on, the whole validation split) and times, in alternating rounds, K training steps and one
evaluation, where K is the evaluation's batch count: both then run K x 8 x 256 token positions (the
evaluation's padded last windows are computed too, so the count is the same). Alternating rounds and
medians keep a busy shared box from loading one side only. Target: an evaluation costs at most 0.4x
the training steps of the same token count (it is a forward only).

convergence: `python -m lockstep.train --config llama3_debug` for 600 steps with validation every 50
(the whole split each time); val_loss against elapsed_s (the run's wall time, evaluations included)
as a PNG under docs/figures/ (benchmarks/results/ is git-ignored) plus JSON.

    .venv/bin/python benchmarks/validation.py cost [--rounds 6] [--threads 1]
    .venv/bin/python benchmarks/validation.py convergence [--steps 600] [--freq 50] [--threads 2]
    .venv/bin/python benchmarks/validation.py plot    # redraw the figure from the convergence JSON
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

RESULTS = Path(__file__).parent / "results"
FIGURE = Path(__file__).parent.parent / "docs" / "figures" / "validation-convergence.png"
SHAPE = ["--training.seq_len", "256", "--training.local_batch_size", "8", "--training.device", "cpu"]


def cost_worker(rounds: int) -> dict:
    """Runs in its own process (OMP_NUM_THREADS set by the parent): alternating timed rounds."""
    import torch

    from lockstep.config import load_config
    from lockstep.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as folder:
        overrides = [*SHAPE, "--training.steps", "100000", "--validation.enable", "--job.dump_folder", folder]
        config = load_config("llama3_debug", overrides)
        with Trainer(config, show_progress=False) as trainer:
            validator = trainer.validator
            batches = validator.num_steps * validator.microbatches_per_step
            trainer.train_step()  # warm-up: allocator, caches, first-call costs
            validator.evaluate()
            train_s, eval_s = [], []
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(batches):
                    trainer.train_step()
                train_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                evaluation = validator.evaluate()
                eval_s.append(time.perf_counter() - start)
    positions = batches * 8 * 256
    train, evaluate = statistics.median(train_s), statistics.median(eval_s)
    return {
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "batches_per_round": batches,
        "token_positions_per_round": positions,
        "val_tokens": evaluation.tokens,
        "train_s_per_round": train_s,
        "eval_s_per_round": eval_s,
        "train_s_median": train,
        "eval_s_median": evaluate,
        "train_tokens_per_sec": positions / train,
        "eval_tokens_per_sec": positions / evaluate,
        "ratio": evaluate / train,
        "load_average": os.getloadavg(),
    }


def cost(rounds: int, threads: int) -> None:
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "cost-worker", "--rounds", str(rounds)]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.splitlines()[-1])  # the trainer may print above it
    print(
        f"{result['batches_per_round']} training steps: {result['train_s_median']:.3f} s "
        f"({result['train_tokens_per_sec']:,.0f} tok/s); one evaluation of the same {result['token_positions_per_round']} "
        f"token positions ({result['val_tokens']} scored): {result['eval_s_median']:.3f} s "
        f"({result['eval_tokens_per_sec']:,.0f} tok/s); medians of {rounds} rounds, {result['threads']} thread(s)"
    )
    print(
        f"evaluation / training = {result['ratio']:.3f}x (target <= 0.4x: {'met' if result['ratio'] <= 0.4 else 'NOT met'})"
    )
    _write("validation_cost", result)


def convergence(steps: int, freq: int, threads: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, "-m", "lockstep.train", "--config", "llama3_debug", *SHAPE,
            "--training.steps", str(steps), "--validation.enable", "--validation.freq", str(freq),
            "--metrics.log_freq", "10", "--job.dump_folder", folder,
        ]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in open(Path(folder) / "metrics.jsonl")]
    keys = ("step", "elapsed_s", "loss", "val_loss", "val_ppl", "val_tokens")
    evaluations = [{k: r[k] for k in keys} for r in records if "val_loss" in r]
    training = [{k: r[k] for k in ("step", "elapsed_s", "loss")} for r in records]
    print("step | elapsed_s | train loss | val_loss | val_ppl")
    for e in evaluations:
        print(f"{e['step']} | {e['elapsed_s']:.1f} | {e['loss']:.4f} | {e['val_loss']:.4f} | {e['val_ppl']:.2f}")
    result = {"steps": steps, "freq": freq, "threads": threads, "evaluations": evaluations, "training": training}
    _write("validation_convergence", result)
    plot(result)


def plot(result: dict) -> None:
    """val_loss and the training loss against elapsed_s. Logging intervals that ran over 1.5x slower
    than the median one are shaded: on a shared box another job's load stretches the time axis there,
    not the losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluations, training = result["evaluations"], result["training"]
    figure, axes = plt.subplots(figsize=(7, 4.2))
    axes.plot([r["elapsed_s"] for r in training], [r["loss"] for r in training], color="C0", alpha=0.4,
              label="training loss (every 10 steps)")  # fmt: skip
    axes.plot([e["elapsed_s"] for e in evaluations], [e["val_loss"] for e in evaluations], color="C1", marker="o",
              label="val_loss (whole validation split)")  # fmt: skip
    for e in evaluations[1::2]:
        axes.annotate(f"step {e['step']}", (e["elapsed_s"], e["val_loss"]), textcoords="offset points",
                      xytext=(0, 8), ha="center", fontsize=7)  # fmt: skip
    slow = _slow_intervals(training)
    for i, (start, end) in enumerate(slow):
        axes.axvspan(start, end, color="grey", alpha=0.15, label="> 1.5x slower steps (shared box)" if i == 0 else None)
    axes.set_xlabel("elapsed_s (training wall time, evaluations included)")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title(f"llama3_debug, built-in corpus, seq 256 x batch 8, CPU, {result['threads']} threads")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(FIGURE, dpi=100)
    plt.close(figure)
    print(f"wrote {FIGURE}")


def _slow_intervals(training: list[dict]) -> list[tuple[float, float]]:
    """(start, end) elapsed_s of the logging intervals whose seconds per step exceed 1.5x the median."""
    pairs = list(zip(training[:-1], training[1:], strict=True))
    per_step = [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]) for a, b in pairs]
    limit = 1.5 * statistics.median(per_step)
    spans: list[tuple[float, float]] = []
    for (a, b), seconds in zip(pairs, per_step, strict=True):
        if seconds <= limit:
            continue
        if spans and spans[-1][1] == a["elapsed_s"]:  # adjacent slow intervals: one span
            spans[-1] = (spans[-1][0], b["elapsed_s"])
        else:
            spans.append((a["elapsed_s"], b["elapsed_s"]))
    return spans


def _write(name: str, result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["cost", "convergence", "plot", "cost-worker"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--freq", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="per process; default 1 (cost), 2 (convergence)")
    args = parser.parse_args()
    if args.what == "cost-worker":
        print(json.dumps(cost_worker(args.rounds)))
    elif args.what == "cost":
        cost(args.rounds, args.threads or 1)
    elif args.what == "plot":  # the figure again from the convergence JSON, without rerunning
        plot(json.loads((RESULTS / "validation_convergence.json").read_text()))
    else:
        convergence(args.steps, args.freq, args.threads or 2)


if __name__ == "__main__":
    main()
