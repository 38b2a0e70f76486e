"""Per-step overhead of lockstep's training step against a plain PyTorch loop on the same model.

For each shape, one process (CPU, --threads threads) builds lockstep's real Trainer from the
llama3_debug preset (plus the shape's overrides) and runs `Trainer.train()` as `lockstep train` does.
After each of its steps, a plain loop takes one step on its own copy of the model: the same class and
initial weights, the same batch (the one lockstep just read), the same AdamW settings, grad clipping,
lr schedule and loss (token cross-entropy, masks as lockstep builds them), and nothing else:

    forward, cross-entropy, backward, clip_grad_norm_, optimizer.step, scheduler.step, zero_grad

The two alternate step by step (A B A B ...), so both see the same machine load. lockstep's step time is
the time between two entries into its step minus the plain step run in between, so it includes the
whole loop of `Trainer.train()` (metrics every log_freq steps, the display, checkpoint checks). The
first --warmup steps are dropped; median, min and max per step are printed for both, and the ratio
plain / lockstep of the medians and of the minima (1.0 = no overhead; the target is >= 0.95).

    .venv/bin/python benchmarks/step_overhead.py [--shapes nanogpt llama3_debug] [--threads 2] \
        [--steps 80] [--warmup 10] [--name step_overhead]
    .venv/bin/python benchmarks/step_overhead.py --dry   # one short step of each, no timings kept

Shapes: nanogpt is nanoGPT's CPU recipe (config/train_shakespeare_char.py with its CPU settings:
4 layers, dim 128, 4 heads, batch 12, block 64) through --model.overrides on the debug flavor;
llama3_debug is the preset as it is (6 x 256, 16 heads, batch 8, seq 256, document masking).
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
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

SHAPES = {
    "nanogpt": [
        "--model.overrides.dim", "128", "--model.overrides.n_layers", "4", "--model.overrides.n_heads", "4",
        "--training.local_batch_size", "12", "--training.seq_len", "64",
    ],
    "llama3_debug": [],
}  # fmt: skip


def measure(shape: str, steps: int, warmup: int, extra: list[str]) -> dict:
    """One shape, in this process (OMP_NUM_THREADS already set): both loops, paired step by step."""
    import torch
    import torch.nn.functional as F

    from lockstep.config import load_config
    from lockstep.data.dataset import IGNORE_INDEX
    from lockstep.train.optimizer import lr_factor
    from lockstep.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as folder:
        overrides = [*SHAPES[shape], "--training.steps", str(steps), "--training.device", "cpu"]
        overrides += ["--job.dump_folder", folder, *extra]
        config = load_config("llama3_debug", overrides)
        trainer = Trainer(config, show_progress=False)
        with trainer:
            (part,) = trainer.model.parts
            plain = type(part)(part.args, trainer.attention_backend)
            plain.load_state_dict(part.state_dict())
            plain.train()
            opt = config.optimizer
            optimizer = torch.optim.AdamW(
                plain.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
                foreach=opt.implementation == "foreach",
            )  # fmt: skip
            total, schedule = config.training.steps, config.lr_scheduler
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, total, schedule))
            max_norm = config.training.max_norm
            masking, eos_id = config.data.document_masking, trainer.tokenizer.eos_id

            def plain_step(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
                masks = plain.get_attention_masks(inputs, eos_id) if masking else None
                logits = plain(inputs, masks)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                return loss.detach()

            read = trainer.loader.next_step
            batches: list = []

            def next_step(*args, **kwargs):
                microbatches, global_tokens = read(*args, **kwargs)
                batches.append(microbatches)
                return microbatches, global_tokens

            trainer.loader.next_step = next_step
            lockstep_step = trainer.train_step
            entries, plain_s, losses = [], [], []

            def paired_step(*args, **kwargs):
                entries.append(time.perf_counter())
                result = lockstep_step(*args, **kwargs)
                (microbatch,) = batches[-1]  # one process: the whole batch is one microbatch
                start = time.perf_counter()
                loss = plain_step(microbatch.inputs, microbatch.labels)
                plain_s.append(time.perf_counter() - start)
                losses.append((result.loss_value, loss))
                return result

            trainer.train_step = paired_step
            trainer.train()
            entries.append(time.perf_counter())  # the loop's end closes the last step
    lockstep_s = [entries[k + 1] - entries[k] - plain_s[k] for k in range(len(plain_s))]
    kept = slice(warmup, None)
    lock_ms, plain_ms = [1e3 * s for s in lockstep_s[kept]], [1e3 * s for s in plain_s[kept]]
    gap = max(abs(a - float(b)) for a, b in losses)
    return {
        "shape": shape,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "batch": config.training.local_batch_size,
        "seq_len": config.training.seq_len,
        "steps_timed": len(lock_ms),
        "lockstep_ms": summary(lock_ms),
        "plain_ms": summary(plain_ms),
        "ratio_median": statistics.median(plain_ms) / statistics.median(lock_ms),
        "ratio_min": min(plain_ms) / min(lock_ms),
        "ratio_paired_median": statistics.median(p / q for p, q in zip(plain_ms, lock_ms, strict=True)),
        "max_loss_gap": gap,
    }


def summary(ms: list[float]) -> dict:
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["nanogpt", "llama3_debug"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=80, help="training.steps of each run (lockstep and plain)")
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped before the figures")
    parser.add_argument("--name", default="step_overhead", help="results/<name>.json")
    parser.add_argument("--dry", action="store_true", help="3 steps of each shape, nothing written")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one shape, in a process of its own
    parser.add_argument("extra", nargs="*", help="extra --section.key value overrides, after --")
    args = parser.parse_args()
    if args.dry:
        args.steps, args.warmup = 3, 1
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.extra)))
        return
    import torch

    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    results = []
    for shape in args.shapes:
        command = [sys.executable, __file__, "--child", shape, "--steps", str(args.steps)]
        command += ["--warmup", str(args.warmup), "--", *args.extra]
        child = subprocess.run(command, env=env, capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"{shape} failed (exit {child.returncode}):\n{child.stdout[-2000:]}{child.stderr[-4000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        results.append(result)
        lock, plain = result["lockstep_ms"], result["plain_ms"]
        print(
            f"{shape:<13} {result['parameters']:>10,} params  batch {result['batch']} x {result['seq_len']}  "
            f"lockstep {lock['median']:7.2f} ms (min {lock['min']:.2f}, max {lock['max']:.2f})  "
            f"plain {plain['median']:7.2f} ms (min {plain['min']:.2f}, max {plain['max']:.2f})  "
            f"ratio {result['ratio_median']:.3f} (min/min {result['ratio_min']:.3f}, "
            f"paired {result['ratio_paired_median']:.3f})  loss gap {result['max_loss_gap']:.1e}"
        )
    if args.dry:
        return
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    record = {
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "extra": args.extra,
        "results": results,
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
