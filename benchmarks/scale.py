"""Peak memory per rank on 2 ranks (torchrun, gloo, CPU) at a Llama 3 shape, against the full fp32
model (issue 11): does each phase scale with the shard (ratio near 1/2) or with the model (near 1+)?

Phases, each measured from a reset of the kernel's peak-RSS mark (``/proc/self/clear_refs``):
  init     meta build + FSDP + init_weights through lockstep's own ``build_model``
  hf-load  ``checkpoint.initial_load_path`` from a Hugging Face folder into that sharded model
           (``--hf-reader full`` times the old way instead: full tensors on every rank, then
           ``set_model_state_dict(full_state_dict=True)``)
  step     one fp32 deterministic training step with 4 microbatches per rank (the Trainer; its
           own, possibly smaller, shape: ``--step-layers``)
  from-hf  ``lockstep convert from-hf`` of that Hugging Face folder on --nproc ranks (each reads and
           writes its shards; lockstep.checkpoint.hf_import), into a scratch folder

Per rank: the peak RSS (VmHWM) and the peak anonymous RSS (RssAnon, sampled every 10 ms; it leaves
out file pages that safetensors maps while reading), both over the rank's RSS just before the model
exists (torch, gloo), divided by the full fp32 model's bytes.

The Hugging Face folder is written first from random weights through the model's adapter, one
safetensors file per block (as published checkpoints are split), in a scratch folder unless --hf-dir.

    .venv/bin/python benchmarks/scale.py [--flavor 1B] [--vocab 2048] [--phases init hf-load step from-hf] [--nproc 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lockstep.models.llama3 import LLAMA3_FLAVORS
from lockstep.models.registry import model_spec

_STATUS = re.compile(r"^(VmHWM|VmRSS|RssAnon|RssFile):\s+(\d+) kB", re.M)


def _status() -> dict[str, int]:
    """This process's memory counters in bytes."""
    return {k: int(v) << 10 for k, v in _STATUS.findall(Path("/proc/self/status").read_text())}


class _Peak:
    """Peak RSS of a block: the kernel's high-water mark (reset on entry) and the sampled peak of
    anonymous memory."""

    def __enter__(self) -> _Peak:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.before = _status()
        self.anon_peak, self._done = self.before["RssAnon"], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.started = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.anon_peak = max(self.anon_peak, _status()["RssAnon"])

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self._done.set()
        self._thread.join()
        self.after = _status()
        self.anon_peak = max(self.anon_peak, self.after["RssAnon"])


def _record(peak: _Peak, baseline: dict[str, int], model_bytes: int) -> dict:
    over, anon_over = peak.after["VmHWM"] - baseline["VmRSS"], peak.anon_peak - baseline["RssAnon"]
    return {
        "seconds": round(peak.seconds, 2),
        "peak_rss_gib": round(peak.after["VmHWM"] / 2**30, 3),
        "peak_over_baseline_gib": round(over / 2**30, 3),
        "ratio": round(over / model_bytes, 3),
        "phase_added_gib": round((peak.after["VmHWM"] - peak.before["VmRSS"]) / 2**30, 3),
        "peak_anon_over_baseline_gib": round(anon_over / 2**30, 3),
        "anon_ratio": round(anon_over / model_bytes, 3),
        "rss_after_gib": round(peak.after["VmRSS"] / 2**30, 3),
    }


def _register(flavor: str, layers: int) -> str:
    """A flavor name for `flavor` with `layers` blocks (registered in this process's table)."""
    if layers <= 0 or layers == LLAMA3_FLAVORS[flavor].n_layers:
        return flavor
    name = f"{flavor}-{layers}L"
    LLAMA3_FLAVORS[name] = dataclasses.replace(LLAMA3_FLAVORS[flavor], n_layers=layers)
    return name


def _model_bytes(flavor: str, vocab: int) -> int:
    spec = model_spec("llama3")
    args = dataclasses.replace(LLAMA3_FLAVORS[flavor], vocab_size=vocab)
    with torch.device("meta"):
        return sum(p.numel() * 4 for p in spec.build(args, "sdpa").parameters())


def write_hf_folder(folder: Path, flavor: str, vocab: int, seq_len: int) -> None:
    """Random fp32 weights in Hugging Face layout, one safetensors file per block (plus one for the
    rest), written one file at a time so this process never holds the model."""
    from safetensors.torch import save_file

    spec = model_spec("llama3")
    args = dataclasses.replace(LLAMA3_FLAVORS[flavor], vocab_size=vocab, max_seq_len=seq_len)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in spec.build(args, "sdpa").named_parameters()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(name.split(".")[1] if name.startswith("layers.") else "rest", []).append(name)
    folder.mkdir(parents=True, exist_ok=True)
    generator, weight_map = torch.Generator().manual_seed(0), {}
    for i, names in enumerate(groups.values(), start=1):
        ours = {name: torch.randn(shapes[name], generator=generator) * 0.02 for name in names}
        hf_state = {k: v.contiguous() for k, v in spec.hf_adapter.to_hf(ours, args).items()}
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(hf_state, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(hf_state, file)
        del ours, hf_state
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(spec.hf_adapter.hf_config(args)))


def measure_init_and_load(options: argparse.Namespace, flavor: str, baseline: dict[str, int], model_bytes: int) -> dict:
    """(a) build_model on 2 ranks, then (b) the Hugging Face folder through load_initial."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from lockstep.checkpoint.hf import load_hf_weights
    from lockstep.checkpoint.initial import load_initial
    from lockstep.checkpoint.manager import CheckpointManager
    from lockstep.config.job import resolve_parallel_dims
    from lockstep.config.sections import (
        ActivationCheckpointConfig,
        CheckpointConfig,
        CompileConfig,
        ModelConfig,
        ParallelismConfig,
    )
    from lockstep.parallel.mesh import build_mesh
    from lockstep.parallel.parallelize import BuildSettings, build_model

    device, parallelism = torch.device("cpu"), ParallelismConfig()
    dims = resolve_parallel_dims(parallelism, int(os.environ["WORLD_SIZE"]))
    settings = BuildSettings(
        dims=dims,
        mesh=build_mesh(dims, device),
        device=device,
        mixed_precision="fp32",
        layout_invariant_reductions=True,
        fsdp=dims.fsdp,
        root_seed=0,
        attention_backend="sdpa",
    )
    results = {}
    with _Peak() as peak:
        built = build_model(
            ModelConfig(flavor=flavor), activation_checkpoint=ActivationCheckpointConfig(), compile_config=CompileConfig(),
            parallelism=parallelism, settings=settings, vocab_size=options.vocab, seq_len=options.seq_len,
        )  # fmt: skip
    results["init"] = _record(peak, baseline, model_bytes)
    if "hf-load" not in options.phases:
        return results
    spec = model_spec("llama3")
    with _Peak() as peak:
        if options.hf_reader == "shard":
            checkpointer = CheckpointManager(
                CheckpointConfig(), dump_folder=Path(options.scratch), identity={}, device=device, log=lambda m: None
            )
            load_initial(
                Path(options.hf_dir),
                checkpointer=checkpointer,
                states={},
                spec=spec,
                args=built.args,
                parts=built.parts,
            )
        else:  # what initial.py did before issue 11: every rank builds the full model, then shards it
            full = {name: torch.empty(p.shape) for part in built.parts for name, p in part.named_parameters()}
            load_hf_weights(Path(options.hf_dir), spec, built.args, full)
            for part in built.parts:
                own = {name: full[name] for name, _ in part.named_parameters()}
                set_model_state_dict(part, own, options=StateDictOptions(full_state_dict=True))
            del full
    results["hf-load"] = _record(peak, baseline, model_bytes)
    return results


def measure_step(options: argparse.Namespace, flavor: str, baseline: dict[str, int], model_bytes: int) -> dict:
    """(c) one fp32 deterministic step, 4 microbatches per rank, through the Trainer (its build and
    init happen before the measured block; the step creates the optimizer state)."""
    from lockstep.config import load_config
    from lockstep.train.trainer import Trainer

    global_batch = 4 * int(os.environ["WORLD_SIZE"])  # local batch 1: 4 microbatches per rank
    overrides = [
        "--job.dump_folder", str(Path(options.scratch) / "step"), "--model.flavor", flavor,
        "--training.steps", "1", "--training.local_batch_size", "1", "--training.global_batch_size", str(global_batch),
        "--training.seq_len", str(options.seq_len), "--training.device", "cpu", "--training.mixed_precision", "fp32",
        "--debug.deterministic", "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "1",
    ]  # fmt: skip
    with Trainer(load_config("llama3_debug", overrides), show_progress=False) as trainer:
        with _Peak() as peak:
            trainer.train()
    return {"step": _record(peak, baseline, model_bytes)}


def measure_from_hf(options: argparse.Namespace, baseline: dict[str, int], model_bytes: int) -> dict:
    """(d) `lockstep convert from-hf` on this launch's ranks: what its workers run, into a scratch folder."""
    from lockstep.checkpoint.hf_import import import_from_hf

    with _Peak() as peak:
        import_from_hf(Path(options.hf_dir), Path(options.scratch) / "from-hf", "llama3")
    return {"from-hf": _record(peak, baseline, model_bytes)}


def rank_main(options: argparse.Namespace) -> None:
    """One rank under torchrun: measure the asked phases, write this rank's JSON."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, baseline = dist.get_rank(), _status()
    if options.phases == ["step"]:
        flavor = _register(options.flavor, options.step_layers)
        results = measure_step(options, flavor, baseline, _model_bytes(flavor, options.vocab))  # closes the group
    elif options.phases == ["from-hf"]:
        flavor = _register(options.flavor, options.layers)
        results = measure_from_hf(options, baseline, _model_bytes(flavor, options.vocab))
        dist.destroy_process_group()
    else:
        flavor = _register(options.flavor, options.layers)
        results = measure_init_and_load(options, flavor, baseline, _model_bytes(flavor, options.vocab))
        dist.destroy_process_group()
    out = Path(options.scratch) / f"{'-'.join(options.phases)}.rank{rank}.json"
    out.write_text(json.dumps({"baseline_rss_gib": round(baseline["VmRSS"] / 2**30, 3), **results}))


def _git_state() -> str:
    """The revision measured: HEAD, and whether lockstep/ had uncommitted changes (and which)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parents[1]).stdout

    dirty = [line[3:] for line in git("status", "--short", "--", "lockstep").splitlines()]
    return git("rev-parse", "--short", "HEAD").strip() + (f" + uncommitted {', '.join(dirty)}" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavor", default="1B", help="llama3 flavor of init and hf-load (default 1B)")
    parser.add_argument("--layers", type=int, default=0, help="blocks of the init/hf-load model (0: the flavor's)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary (the built-in tokenizer's: 2048)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--phases", nargs="+", default=["init", "hf-load", "step"], choices=["init", "hf-load", "step", "from-hf"]
    )
    parser.add_argument("--hf-reader", default="shard", choices=["shard", "full"], help="full: the pre-issue-11 way")
    parser.add_argument("--hf-dir", help="reuse (or keep) this Hugging Face folder instead of a scratch one")
    parser.add_argument("--step-layers", type=int, default=2, help="blocks of the step phase's model (0: all)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.rank:
        rank_main(options)
        return
    flavor, step_flavor = _register(options.flavor, options.layers), _register(options.flavor, options.step_layers)
    report = {
        "code": _git_state(),
        "flavor": flavor,
        "vocab": options.vocab,
        "seq_len": options.seq_len,
        "full_model_fp32_gib": round(_model_bytes(flavor, options.vocab) / 2**30, 3),
        "step_flavor": step_flavor,
        "step_full_model_fp32_gib": round(_model_bytes(step_flavor, options.vocab) / 2**30, 3),
        "hf_reader": options.hf_reader,
    }
    # Fresh processes per group, so one group's freed memory cannot hide in the next one's figures.
    groups = [[p for p in options.phases if p in ("init", "hf-load")]]
    groups += [[p] for p in ("from-hf", "step") if p in options.phases]
    with tempfile.TemporaryDirectory(prefix="lockstep-scale-") as scratch:
        hf_dir = Path(options.hf_dir or Path(scratch) / "hf")
        if {"hf-load", "from-hf"} & set(options.phases) and not (hf_dir / "config.json").is_file():
            started = time.perf_counter()
            write_hf_folder(hf_dir, flavor, options.vocab, options.seq_len)
            report["hf_folder_write_s"] = round(time.perf_counter() - started, 1)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={options.nproc}"]
        for phases in filter(None, groups):
            forwarded = [
                "--flavor", options.flavor, "--layers", str(options.layers), "--vocab", str(options.vocab),
                "--seq-len", str(options.seq_len),
                "--hf-reader", options.hf_reader, "--hf-dir", str(hf_dir), "--step-layers", str(options.step_layers),
                "--scratch", scratch, "--phases", *phases,
            ]  # fmt: skip
            subprocess.run(
                [*torchrun, __file__, "--rank", *forwarded], check=True, env=os.environ | {"OMP_NUM_THREADS": "1"}
            )
            for rank in range(options.nproc):
                measured = json.loads((Path(scratch) / f"{'-'.join(phases)}.rank{rank}.json").read_text())
                report.setdefault("ranks", [{} for _ in range(options.nproc)])[rank] |= {
                    f"{k}@{'-'.join(phases)}" if k == "baseline_rss_gib" else k: v for k, v in measured.items()
                }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
