"""``lockstep estimate``: will this layout fit, and what will it send? Per-rank peak memory by term for
the worst rank of each pipeline stage, bytes per step by collective and link class, the step time and
MFU ceiling on a device, a verdict, and the nearest layouts that fit. Runs on one CPU; allocates no model.

Exit codes: 0 it fits; 1 it does not fit; 2 bad config or arguments."""

from __future__ import annotations

import argparse
import json
import sys

from lockstep.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, print_json
from lockstep.cli.arguments import MAX_PROCESSES_PER_MACHINE, Parser, integer, number
from lockstep.config import load_config
from lockstep.tools.estimate import DEVICES, Topology, device_spec, estimate, nearest_fitting, render


def run(argv: list[str]) -> int:
    parser = Parser(
        prog="lockstep estimate",
        description="Predict per-rank memory and per-step communication of a config at any world size. Any "
        "other --section.key value pair overrides the config, as for lockstep train.",
    )
    parser.add_argument("--config", help="a shipped config name (e.g. llama3_70b) or a TOML file path")
    parser.add_argument("--nproc", type=integer(1, 10**7), help="ranks on one node (the world size)")
    parser.add_argument("--nnodes", type=integer(1, 10**6), help="nodes (with --nproc-per-node)")
    parser.add_argument(
        "--nproc-per-node", type=integer(1, MAX_PROCESSES_PER_MACHINE), help="ranks (GPUs) per node (default 8)"
    )
    parser.add_argument("--device", default="h100", choices=[*DEVICES, "cpu"], help="device kind (default h100)")
    parser.add_argument(
        "--device-memory", type=number(0, above=True), help="GiB per device, instead of the device kind's"
    )
    parser.add_argument("--peak-tflops", type=number(0, above=True), help="dense matmul TFLOP/s in the compute dtype")
    parser.add_argument("--hbm-gbps", type=number(0, above=True), help="device memory bandwidth, GB/s")
    parser.add_argument(
        "--intra-node-gbps", type=number(0, above=True), help="per device, one direction, inside a node, GB/s"
    )
    parser.add_argument(
        "--inter-node-gbps", type=number(0, above=True), help="per device, one direction, between nodes, GB/s"
    )
    parser.add_argument("--vocab-size", type=integer(1, 2**31), help="the tokenizer's size, when its file is not here")
    parser.add_argument("--no-advice", action="store_true", help="skip the search for layouts that fit")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args, overrides = parser.parse_known_args(argv)
    for flag in ("vocab_size", "device_memory", "peak_tflops", "hbm_gbps", "intra_node_gbps", "inter_node_gbps"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            print(f"lockstep estimate: error: --{flag.replace('_', '-')} must be > 0; got {value}", file=sys.stderr)
            return EXIT_BAD_INPUT
    topology = _topology(parser, args)
    if topology is None:
        return EXIT_BAD_INPUT
    device = device_spec(
        args.device, memory_gib=args.device_memory, peak_tflops=args.peak_tflops, hbm_gbps=args.hbm_gbps,
        intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
    )  # fmt: skip
    config = load_config(args.config, overrides)
    result = estimate(config, topology, device, vocab_size=args.vocab_size)
    if not result.verdict["fits"] and not args.no_advice:
        result.advice = nearest_fitting(config, topology, device, result.config["vocab_size"])
    if args.json:
        print_json(json.dumps(result.as_dict(), indent=1))
    else:
        print(render(result))
    return EXIT_OK if result.verdict["fits"] else EXIT_FAILURE


def _topology(parser: argparse.ArgumentParser, args) -> Topology | None:
    if args.nproc is not None and (args.nnodes is not None or args.nproc_per_node is not None):
        print("lockstep estimate: error: give --nproc N, or --nnodes A --nproc-per-node B, not both", file=sys.stderr)
        return None
    if args.nproc is not None:
        nnodes, per_node = 1, args.nproc
    else:
        nnodes, per_node = args.nnodes or 1, args.nproc_per_node or 8
    if nnodes < 1 or per_node < 1:
        print("lockstep estimate: error: --nproc, --nnodes and --nproc-per-node must be >= 1", file=sys.stderr)
        return None
    return Topology(nnodes, per_node)
