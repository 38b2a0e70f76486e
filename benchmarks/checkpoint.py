"""Checkpoint save/load time and size: llama3_debug and the Llama 3.2 1B shape (vocab 2048), one
process, through lockstep's CheckpointManager (DCP, atomic publish).

For each case: a full checkpoint (model + AdamW state + the rest) or a model-only export in fp32 or
bf16, saved synchronously or asynchronously (for async, "blocking" is the time the training loop
waits: staging a copy; the write finishes in the background), then loaded back. The content
checksums' share is measured directly: the time spent hashing inside the writer's stream during the
save (checksum_save_s), and during the load what only verification costs (verify_s: the size and
allow-list checks before it, hashing the bytes as the reader reads them, and reading the gaps between
the items it needs), each as a fraction of the rest.

    .venv/bin/python benchmarks/checkpoint.py [--flavors debug 1B] [--modes disabled async]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lockstep.checkpoint.manager import CheckpointManager
from lockstep.checkpoint.states import ModelState, OptimizerState
from lockstep.config.sections import CheckpointConfig, ModelConfig, OptimizerConfig
from lockstep.models.registry import model_args
from lockstep.train.observe.throughput import peak_memory_gib
from lockstep.train.optimizer import build_optimizer

RESULTS = Path(__file__).parent / "results"


def build(flavor: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    spec, args = model_args(ModelConfig(flavor=flavor), vocab_size=2048, max_seq_len=2048)
    with torch.device("meta"):
        model = spec.build(args, "sdpa")
    model.init_weights(0, "cpu")
    optimizer = build_optimizer(model.named_parameters(), OptimizerConfig())
    for p in model.parameters():  # one step on zero gradients creates the AdamW state
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def folder_gib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**30


def measure(model, optimizer, kind: str, dtype: str, mode: str, scratch: Path) -> dict:
    config = CheckpointConfig(enable=True, folder="ckpt", async_mode=mode)
    manager = CheckpointManager(
        config, dump_folder=scratch, identity={"model": {}}, device=torch.device("cpu"), log=lambda message: None
    )
    model_state = ModelState([model], dtype=torch.bfloat16 if dtype == "bf16" else None)
    states = {"model": model_state}
    if kind == "full":
        states["optimizer"] = OptimizerState([model], [optimizer])
    started = time.perf_counter()
    manager.save(1, states, model_only=kind == "model-only")
    blocking = time.perf_counter() - started
    manager.wait()
    total = time.perf_counter() - started
    folder = manager.root / "step-00000001"
    size = folder_gib(folder)
    load_states = {"model": ModelState([model])} | ({"optimizer": states["optimizer"]} if kind == "full" else {})
    started = time.perf_counter()
    manager.load(folder, load_states)
    load = time.perf_counter() - started
    shutil.rmtree(manager.root)
    checksum, verify = manager.timings["checksum_s"], manager.timings["verify_s"]
    return {
        "save_blocking_s": blocking, "save_total_s": total, "load_s": load, "size_gib": size,
        "checksum_save_s": checksum, "checksum_save_frac": checksum / (total - checksum),
        "verify_s": verify, "verify_load_frac": verify / (load - verify),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavors", nargs="+", default=["debug", "1B"])
    parser.add_argument(
        "--modes", nargs="+", default=["disabled", "async"], help="async needs a second copy in memory (1B: ~22 GiB)"
    )
    args = parser.parse_args()
    cases = [
        ("full", "fp32", "disabled"),
        ("full", "fp32", "async"),
        ("model-only", "fp32", "disabled"),
        ("model-only", "bf16", "disabled"),
        ("model-only", "bf16", "async"),
    ]
    rows = []
    for flavor in args.flavors:
        model, optimizer = build(flavor)
        params = sum(p.numel() for p in model.parameters())
        for kind, dtype, mode in (case for case in cases if case[2] in args.modes):
            with tempfile.TemporaryDirectory(dir=".") as scratch:
                result = measure(model, optimizer, kind, dtype, mode, Path(scratch))
            row = {"flavor": flavor, "params": params, "kind": kind, "dtype": dtype, "mode": mode, **result}
            rows.append(row)
            print(
                f"{flavor:>5} {params / 1e6:7.1f}M {kind:<10} {dtype} {mode:<8} size {result['size_gib']:6.3f} GiB  "
                f"save {result['save_total_s']:6.2f}s (blocking {result['save_blocking_s']:6.2f}s)  "
                f"load {result['load_s']:6.2f}s  checksum {result['checksum_save_s']:5.2f}s "
                f"({100 * result['checksum_save_frac']:4.1f}% of save)  verify {result['verify_s']:5.2f}s "
                f"({100 * result['verify_load_frac']:4.1f}% of load)",
                flush=True,
            )
        del model, optimizer
    print(f"peak RSS {peak_memory_gib(torch.device('cpu')):.2f} GiB")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
