"""lockstep estimate against measurement, the whole matrix (issue 23): for each layout, AC mode, determinism
and precision, every pipeline stage's worst rank is run for real under torchrun (gloo, one thread per rank;
peak from the CPU allocator's own record of every allocation, bytes counted at every collective call) and
estimated on fake tensors at the same world size (peak measured by torch's MemTracker, by the CPU allocator
under pipelining; the CPU allocator's figure, which adds gloo's staging buffers, is printed beside it); the benchmark prints the ratio of the peaks and the
largest relative difference of any collective kind's bytes, and writes benchmarks/results/estimate_accuracy.json.

    .venv/bin/python benchmarks/estimate_accuracy.py [--layouts one fsdp2 ...] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = {
    "one": ("llama3_debug", 1, []),
    "fsdp2": ("llama3_debug", 2, []),
    "hsdp2x2": ("llama3_debug", 4, ["--parallelism.data_parallel_replicate_degree", "2"]),
    "tp2": ("llama3_debug", 2, ["--parallelism.tensor_parallel_degree", "2"]),
    "pp2": ("llama3_debug", 2, ["--parallelism.pipeline_parallel_degree", "2"]),
    "ep2": ("deepseek_v3_debug", 2, ["--parallelism.expert_parallel_degree", "2"]),
}
VOCAB = 2048
RESULTS = Path(__file__).parent / "results" / "estimate_accuracy.json"


def rank_body(name: str, overrides: list[str], folder: str) -> None:
    import torch
    import torch.distributed as dist

    from lockstep.config import load_config
    from lockstep.config.job import resolve_parallel_dims
    from lockstep.tools.estimate.measure import measure_rank

    torch.set_num_threads(1)
    config = load_config(name, overrides)
    world = int(os.environ["WORLD_SIZE"])
    dims = resolve_parallel_dims(config.parallelism, world)
    dist.init_process_group("gloo")
    measured = measure_rank(config, dims, ranks_per_node=world, vocab_size=VOCAB)  # MemTracker (allocator under PP)
    allocator = measure_rank(config, dims, ranks_per_node=world, vocab_size=VOCAB, instrument="allocator")
    dist.destroy_process_group()
    record = {"peak": measured.peak_bytes, "allocator": allocator.peak_bytes, "traffic": measured.traffic.as_dict()}
    Path(folder, f"rank{measured.rank}.json").write_text(json.dumps(record))


def case(layout: str, ac: str, deterministic: bool, precision: str) -> dict:
    from lockstep.config import load_config
    from lockstep.tools.estimate import Topology, device_spec, estimate
    from lockstep.tools.estimate.devices import GIB

    name, world, extra = LAYOUTS[layout]
    overrides = [*extra, "--activation_checkpoint.mode", ac, "--training.mixed_precision", precision]
    overrides += ["--debug.deterministic"] if deterministic else []
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   __file__, "--rank-body", name, folder, *overrides]  # fmt: skip
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        measured = {r: json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)}
    started = time.perf_counter()
    result = estimate(load_config(name, overrides), Topology(1, world), device_spec("cpu"), vocab_size=VOCAB)
    seconds = time.perf_counter() - started
    stages = []
    for stage in result.stages:
        truth = measured[stage.rank]
        predicted = sum(v for k, v in stage.memory.items() if k != "cuda_context_and_nccl")
        wire = [
            abs(stage.traffic.get(kind, {}).get(f"{link}_gb", 0.0) * 1e9 - sent[link]) / max(sent[link], 1)
            for kind, sent in truth["traffic"].items() for link in ("intra", "inter") if sent[link]
        ]  # fmt: skip
        kinds_match = set(stage.traffic) == set(truth["traffic"])
        stages.append({
            "stage": stage.stage, "rank": stage.rank, "predicted_gib": predicted,
            "measured_gib": truth["peak"] / GIB, "ratio": predicted / (truth["peak"] / GIB),
            "instrument": "allocator" if LAYOUTS[layout][2][:1] == ["--parallelism.pipeline_parallel_degree"] else "memtracker",
            "allocator_gib": truth["allocator"] / GIB, "allocator_ratio": predicted / (truth["allocator"] / GIB),
            "worst_wire_error": max(wire, default=0.0), "same_collectives": kinds_match,
        })  # fmt: skip
    return {"layout": layout, "ac": ac, "deterministic": deterministic, "precision": precision,
            "estimate_s": round(seconds, 2), "stages": stages}  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-body":
        rank_body(sys.argv[2], sys.argv[4:], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--quick", action="store_true", help="AC none and full, deterministic off, fp32 and bf16")
    args = parser.parse_args()
    acs = ("none", "full") if args.quick else ("none", "selective", "full")
    determinism = (False,) if args.quick else (False, True)
    rows = []
    print(
        "| layout | AC | deterministic | precision | stage | predicted GiB | measured GiB | ratio | worst bytes error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for layout, ac, det, precision in itertools.product(args.layouts, acs, determinism, ("fp32", "bf16")):
        row = case(layout, ac, det, precision)
        rows.append(row)
        for s in row["stages"]:
            same = "" if s["same_collectives"] else " (collectives differ)"
            print(f"| {layout} | {ac} | {'on' if det else 'off'} | {precision} | {s['stage']} | {s['predicted_gib']:.4f} | "
                  f"{s['measured_gib']:.4f} | {s['ratio']:.4f} | {s['allocator_gib']:.4f} | {s['allocator_ratio']:.4f} | "
                  f"{100 * s['worst_wire_error']:.3f}%{same} |", flush=True)  # fmt: skip
    ratios = [s["ratio"] for r in rows for s in r["stages"]]
    wire = [s["worst_wire_error"] for r in rows for s in r["stages"]]
    allocator = [s["allocator_ratio"] for r in rows for s in r["stages"]]
    summary = {"cases": len(rows), "ratio_min": min(ratios), "ratio_max": max(ratios), "worst_wire_error": max(wire),
               "allocator_ratio_min": min(allocator), "allocator_ratio_max": max(allocator),
               "all_collectives_match": all(s["same_collectives"] for r in rows for s in r["stages"])}  # fmt: skip
    print(json.dumps(summary))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
