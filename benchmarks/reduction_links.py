"""Bytes per link class of the gradient reductions on a real two-node launch (issue 24): two torchrun
processes with --nnodes 2 on loopback, 2 ranks each, train llama3_debug for 3 steps under FSDP 4 and DDP 4
(HSDP 2x2 too), with the canonical reductions and with the backend's own. Every collective call is
counted per peer (``WireCounter``, nodes as torchrun numbered the ranks) and set against what a
hierarchical ring sends between nodes for the same logical collectives (S/G x (N-1)/N per rank for a
reduce-scatter or all-gather of S bytes over N nodes of G ranks, twice that for an all-reduce).
Writes benchmarks/results/reduction_links.json.

    .venv/bin/python benchmarks/reduction_links.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {
    "fsdp4": [],
    "ddp4": ["--parallelism.data_parallel_replicate_degree", "4"],
    "hsdp2x2": ["--parallelism.data_parallel_replicate_degree", "2"],
}
RESULTS = Path(__file__).parent / "results" / "reduction_links.json"
REDUCTIONS = ("reduce_scatter", "all_reduce")


def rank_body(folder: str, overrides: list[str]) -> None:
    import torch

    from lockstep.config import load_config
    from lockstep.tools.estimate.wire import WireCounter
    from lockstep.train.trainer import Trainer

    torch.set_num_threads(1)
    config = load_config("llama3_debug", [*overrides, "--job.dump_folder", folder, "--metrics.log_freq", "1"])
    rank, per_node = int(os.environ["RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    counter = WireCounter(rank, per_node)
    with Trainer(config, show_progress=False) as trainer, counter:
        trainer.train()
    record = {name: getattr(counter, name).as_dict() for name in ("traffic", "hierarchical", "as_ring")}
    Path(folder, f"links{rank}.json").write_text(json.dumps(record))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(overrides: list[str]) -> dict[int, dict]:
    """Two torchrun processes, one per node, 2 ranks each, rendezvous on loopback."""
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        nodes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes=2",
                    "--nproc-per-node=2",
                    f"--node-rank={node}",
                    "--master-addr=127.0.0.1",
                    f"--master-port={port}",
                    __file__,
                    "--rank-body",
                    folder,
                    *overrides,
                ],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            for node in range(2)
        ]
        for node in nodes:
            output, _ = node.communicate()
            if node.returncode:
                raise SystemExit(f"a node failed:\n{output.decode()[-3000:]}")
        return {r: json.loads(Path(folder, f"links{r}.json").read_text()) for r in range(4)}


def reduction_bytes(record: dict, link: str) -> int:
    return sum(v[link] for kind, v in record.items() if kind.startswith(REDUCTIONS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for layout, flags in LAYOUTS.items():
        for canonical in (True, False):
            overrides = [*flags, "--training.steps", str(args.steps)]
            overrides += [] if canonical else ["--debug.no-layout-invariant-reductions"]
            ranks = launch(overrides)
            worst = max(ranks, key=lambda r: reduction_bytes(ranks[r]["traffic"], "inter"))
            record = ranks[worst]
            inter = reduction_bytes(record["traffic"], "inter")
            floor = reduction_bytes(record["hierarchical"], "inter")
            rows.append({
                "layout": layout, "reductions": "canonical" if canonical else "native", "rank": worst,
                "inter_bytes": inter, "intra_bytes": reduction_bytes(record["traffic"], "intra"),
                "hierarchical_ring_inter_bytes": floor, "ratio": inter / floor, "per_kind": record["traffic"],
            })  # fmt: skip
            print(f"{layout} {rows[-1]['reductions']}: reductions send {inter / 1e6:.2f} MB between nodes "
                  f"(hierarchical ring {floor / 1e6:.2f} MB, x{inter / floor:.3f}), "
                  f"{rows[-1]['intra_bytes'] / 1e6:.2f} MB inside", flush=True)  # fmt: skip
    print("\n| layout | reductions | inter-node MB (busiest rank) | hierarchical ring MB | ratio | intra-node MB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['layout']} | {row['reductions']} | {row['inter_bytes'] / 1e6:.2f} | "
              f"{row['hierarchical_ring_inter_bytes'] / 1e6:.2f} | {row['ratio']:.3f} | {row['intra_bytes'] / 1e6:.2f} |")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-body"]:
        rank_body(sys.argv[2], sys.argv[3:])
    else:
        main()
