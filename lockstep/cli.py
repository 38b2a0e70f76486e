"""The ``lockstep`` command: ``lockstep train --config NAME_OR_PATH [--section.key value ...]``,
``lockstep convert to-hf|from-hf ...`` and ``lockstep config-reference``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lockstep.config import ConfigError, load_config, validate_job_config


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lockstep train",
        description="Train a model. Any other --section.key value pair overrides the config "
        "(e.g. --training.steps 10 --debug.deterministic).",
    )
    parser.add_argument("--config", help="a shipped config name (e.g. llama3_debug) or a TOML file path")
    parser.add_argument(
        "--nproc", type=int, default=0, help="start N processes on this machine through torchrun (multi-node: torchrun)"
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides)
        if args.nproc > 0:
            validate_job_config(config, args.nproc)  # fail here, before N processes start
            return _torchrun(args.nproc, argv)
        from lockstep.train.trainer import Trainer

        trainer = Trainer(config)
    except ConfigError as e:
        print(f"lockstep: config error: {e}", file=sys.stderr)
        return 2
    if config.debug.print_config:
        from lockstep.config import dump_toml

        print(dump_toml(config))
    with trainer:
        run_folder = trainer.train()
    print(f"run folder: {run_folder.resolve()}")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun --standalone with N processes (one machine), one share of
    the CPU threads each unless OMP_NUM_THREADS is set."""
    import os
    import subprocess

    forwarded, skip = [], False
    for arg in argv:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            forwarded.append(arg)
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "lockstep.train", *forwarded]
    return subprocess.call(command, env=os.environ | {"OMP_NUM_THREADS": threads})


def _config_reference(argv: list[str]) -> int:
    from lockstep.config.reference import config_reference

    print(config_reference())
    return 0


def _convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lockstep convert", description="Hugging Face <-> lockstep checkpoints.")
    sub = parser.add_subparsers(dest="direction", required=True)
    to_hf = sub.add_parser("to-hf", help="a lockstep checkpoint (or run folder) -> safetensors + config.json")
    to_hf.add_argument("source", type=Path)
    to_hf.add_argument("out_dir", type=Path)
    to_hf.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    from_hf = sub.add_parser("from-hf", help="a Hugging Face folder -> a model-only lockstep checkpoint (step 0)")
    from_hf.add_argument("hf_dir", type=Path)
    from_hf.add_argument("out_dir", type=Path)
    from_hf.add_argument("--model", default="llama3", help="model family of the weights")
    args = parser.parse_args(argv)
    from lockstep.checkpoint.hf import export_to_hf, import_from_hf

    try:
        if args.direction == "to-hf":
            timings = export_to_hf(args.source, args.out_dir, args.dtype)
        else:
            timings = import_from_hf(args.hf_dir, args.out_dir, args.model)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"lockstep convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}  " + "  ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return 0


def _compare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lockstep compare",
        description="Compare runs (run folders or loss files) step by step; with --run, launch them first.",
    )
    parser.add_argument("runs", nargs="*", type=Path, help="run folders or loss files (JSONL)")
    parser.add_argument("--assert-equal", action="store_true", help="exit 1 unless bitwise equal at every step")
    parser.add_argument("--rtol", type=float, default=None, help="exit 1 if a loss differs beyond rtol/atol")
    parser.add_argument("--atol", type=float, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the curves and their difference")
    parser.add_argument("--run", action="store_true", help="launch the runs: two --config, or one and two --rev")
    parser.add_argument("--config", action="append", default=[], help="with --run: a config (twice for two)")
    parser.add_argument("--rev", action="append", default=[], help="with --run: a git revision (twice)")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="with --run: where runs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=1)
    args, overrides = parser.parse_known_args(argv)
    from lockstep.tools import compare

    runs = args.runs
    if args.run:
        if not (len(args.config) == 2 and not args.rev) and not (len(args.config) == 1 and len(args.rev) == 2):
            parser.error("--run needs two --config, or one --config and two --rev")
        from lockstep.tools.run_pair import launch_pair

        runs = launch_pair(args.config, args.rev, overrides, args.out, args.seed, args.nproc)
    elif overrides:
        parser.error(f"unknown arguments {overrides}")
    if len(runs) < 2:
        parser.error("give at least two runs")
    names = [str(r) for r in runs]
    try:
        rows = compare.compare_series([compare.load_series(r) for r in runs])
    except FileNotFoundError as e:
        print(f"lockstep compare: {e}", file=sys.stderr)
        return 2
    print(compare.format_table(rows, names))
    first = compare.first_difference(rows, args.rtol, args.atol)
    tolerance = f" beyond rtol={args.rtol} atol={args.atol}" if (args.rtol or args.atol) else " (bitwise)"
    print(f"first differing step{tolerance}: {first}" if first is not None else f"no difference{tolerance}")
    plot = args.plot or (args.out / "compare.png" if args.run else None)
    if plot is not None:
        compare.plot(rows, names, plot)
        print(f"plot: {plot}")
    failing = first is not None and (args.assert_equal or args.rtol is not None or args.atol is not None)
    return 1 if failing else 0


def _bisect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lockstep bisect",
        description="Find the first step where two runs differ and the first module (or the reduction, "
        "or the optimizer update) that makes the difference, by replaying that step with hooks.",
    )
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--work", type=Path, default=None, help="where replay captures go (default: a temp dir)")
    args = parser.parse_args(argv)
    import tempfile

    from lockstep.tools.bisect import bisect

    work = args.work or Path(tempfile.mkdtemp(prefix="lockstep-bisect-"))
    finding = bisect(args.run_a, args.run_b, work)
    print(finding.describe())
    return 0 if finding.step is None else 1


def _audit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lockstep audit",
        description="Run a few steps with deterministic warn-only mode and list every nondeterministic op "
        "and every layout-dependent feature of the config (exit 1 if any is nondeterministic).",
    )
    parser.add_argument("--config", help="a shipped config name or a TOML file path")
    parser.add_argument("--steps", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    import tempfile

    from lockstep.tools.audit import audit_overrides, config_findings, format_findings, torch_alerts

    try:
        config = load_config(args.config, overrides)
        known = config_findings(
            config.debug, config.parallelism, config.optimizer, config.training, config.compile, config.model
        )
        with tempfile.TemporaryDirectory() as folder:
            audited = load_config(args.config, overrides + audit_overrides(args.steps, f"{folder}/run"))
            from lockstep.train.trainer import Trainer

            def run() -> None:
                with Trainer(audited, show_progress=False) as trainer:
                    trainer.train()

            findings = torch_alerts(run) + known
    except ConfigError as e:
        print(f"lockstep: config error: {e}", file=sys.stderr)
        return 2
    print(format_findings(findings))
    return 1 if any(f.verdict == "nondeterministic" for f in findings) else 0


COMMANDS = {
    "train": _train,
    "audit": _audit,
    "convert": _convert,
    "compare": _compare,
    "bisect": _bisect,
    "config-reference": _config_reference,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: lockstep {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
