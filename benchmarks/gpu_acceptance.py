"""One prepared GPU acceptance run (issue 27): every CUDA path and the GPU figures, in one command that
fits a short lease.

    python3 benchmarks/gpu_acceptance.py OUT [--budget-s 480] [--only STAGE ...]   # on the GPU machine
    .venv/bin/python benchmarks/gpu_acceptance.py OUT --dry-run                    # here: plans only

It runs on the machine's own torch, with lockstep imported from this checkout, and installs nothing from
the network: each package of benchmarks/gpu_wheels/ (pinned by SHA256SUMS) whose distribution the
machine lacks is unpacked into OUT/site. Stages run in order of value, each in subprocesses under its
own time budget; a stage that fails or runs out of time is recorded and the next one runs. OUT gets
results.json and results.md (device, torch and CUDA versions, each stage's status, figures and log).

Stages:
  cuda_tests   every GPU-gated test (module-level or per-test skipif on CUDA), through pytest
  smoke        llama3_debug in bf16 with FlexAttention and selective AC, compile off and on;
               --debug.deterministic twice (bitwise); deepseek_v3_debug in bf16 with EP, canonical and
               plain reductions; TP 2 and PP 2 with 2 GPUs or more. Each point: tokens/s, MFU and
               max_memory_allocated next to `lockstep estimate`'s prediction
  torchtitan   Llama 3 at 1B shape in bf16, lockstep and torchtitan 0.2.2 (the release before the one
               that needs torch 2.14) on the same GPU, shape, batch, sequence, AC and compile settings
  determinism  what --debug.deterministic and the canonical reductions cost at the 1B shape

`--dry-run` builds every stage's command lines and configs and checks them (lockstep's through its own
config loader, torchtitan's against the field names of its JobConfig), resolves the wheel list against
SHA256SUMS, and checks that the budgets add up to the total; it runs nothing.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from collections.abc import Callable
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEELS = HERE / "gpu_wheels"
TOTAL_BUDGET_S = 480
"""8 minutes: a lease allows 10 per command, and the machine's start and the copy back need the rest."""
TORCHTITAN_WHEEL = "torchtitan-0.2.2-py3-none-any.whl"


@dataclasses.dataclass
class Run:
    """One process of a stage: `argv` run from the checkout under `timeout_s`."""

    label: str
    argv: list[str]
    timeout_s: int
    lockstep_args: list[str] | None = None
    """For `lockstep train` runs: the arguments after `train`, checked by --dry-run."""
    nproc: int = 1
    run_folder: Path | None = None


@dataclasses.dataclass
class Stage:
    name: str
    budget_s: int
    plan: Callable[[Context], list[Run]]
    figures: Callable[[Context, list[dict]], dict]


@dataclasses.dataclass
class Context:
    out: Path
    gpus: int
    python: str
    device_kind: str
    """lockstep estimate's --device: h100 or h200 (by the device's name)."""
    env: dict[str, str]
    dry_run: bool = False


# -- wheels ------------------------------------------------------------------------------------------


def pinned_wheels() -> dict[str, str]:
    """{file name: sha256} from gpu_wheels/SHA256SUMS."""
    pinned = {}
    for line in (WHEELS / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        pinned[name] = digest
    return pinned


def wheel_distribution(path: Path) -> tuple[str, str]:
    """(distribution name, version) from a wheel's METADATA."""
    with zipfile.ZipFile(path) as wheel:
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        fields = dict(
            line.split(": ", 1)
            for line in wheel.read(metadata).decode().splitlines()
            if ": " in line and line[0].isalpha()
        )
    return fields["Name"], fields["Version"]


def check_wheels() -> list[str]:
    """Problems with the carried wheels: missing, altered, unlisted, or not for CPython 3.12 on x86-64."""
    problems = []
    pinned = pinned_wheels()
    for name, digest in pinned.items():
        path = WHEELS / name
        if not path.is_file():
            problems.append(f"{name}: listed in SHA256SUMS but absent")
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{name}: its sha256 differs from SHA256SUMS")
        tags = name.removesuffix(".whl").split("-")[-3:]
        if not (tags[0].startswith(("py3", "cp312", "cp36", "cp310")) and (tags[2] == "any" or "x86_64" in tags[2])):
            problems.append(f"{name}: tags {tags} do not fit CPython 3.12 on x86-64")
        wheel_distribution(path)
    problems += [f"{p.name}: not in SHA256SUMS" for p in WHEELS.glob("*.whl") if p.name not in pinned]
    if TORCHTITAN_WHEEL not in pinned:
        problems.append(f"{TORCHTITAN_WHEEL}: the torchtitan stage needs it")
    return problems


def unpack_missing_wheels(site: Path) -> list[str]:
    """Unpack every carried wheel whose distribution this Python lacks into `site`; the ones unpacked."""
    site.mkdir(parents=True, exist_ok=True)
    unpacked = []
    for name in sorted(pinned_wheels()):
        distribution, _ = wheel_distribution(WHEELS / name)
        try:
            importlib.metadata.version(distribution)
            continue
        except importlib.metadata.PackageNotFoundError:
            pass
        with zipfile.ZipFile(WHEELS / name) as wheel:
            wheel.extractall(site)
        unpacked.append(name)
    return unpacked


# -- lockstep runs -----------------------------------------------------------------------------------


def lockstep_train(
    ctx: Context, label: str, config: str, *args: str, nproc: int = 1, steps: int = 20, timeout_s: int = 60
) -> Run:
    folder = ctx.out / "runs" / label
    arguments = [
        "--config", config, "--training.device", "cuda", "--training.steps", str(steps),
        "--metrics.log_freq", "5", "--job.dump_folder", str(folder), "--data.cache_folder", str(ctx.out / "cache"),
        "--debug.seed", "0", *args,
    ]  # fmt: skip
    launch = ["--nproc", str(nproc)] if nproc > 1 else []
    argv = [ctx.python, "-m", "lockstep", "train", *launch, *arguments]
    return Run(label, argv, timeout_s, lockstep_args=arguments, nproc=nproc, run_folder=folder)


def estimate(ctx: Context, run: Run) -> float | None:
    """`lockstep estimate`'s predicted peak of rank 0 for a run's config, without the CUDA context (which
    max_memory_allocated does not see), in GiB; None if it cannot say."""
    args = [a for a in run.lockstep_args if a not in ("--training.device", "cuda")]
    argv = [
        ctx.python,
        "-m",
        "lockstep",
        "estimate",
        "--nproc",
        str(run.nproc),
        "--device",
        ctx.device_kind,
        "--json",
        *args,
    ]
    done = subprocess.run(argv, cwd=REPO, env=ctx.env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return None
    stage = json.loads(done.stdout)["stages"][0]
    return stage["total_gib"] - stage["memory"].get("cuda_context_and_nccl", 0.0)


def last_record(run: Run) -> dict:
    lines = (run.run_folder / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def losses(run: Run) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (run.run_folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in records if "loss" in r]


# -- stages ------------------------------------------------------------------------------------------


def gpu_gated_tests() -> list[str]:
    """Node ids of every test skipped without CUDA: modules whose pytestmark, or functions whose
    decorators, name torch.cuda.is_available."""
    ids = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        relative = str(path.relative_to(REPO))
        marks = [
            n
            for n in tree.body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
        ]
        if any("cuda.is_available" in ast.unparse(m.value) for m in marks):
            ids.append(relative)
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(
                "cuda.is_available" in ast.unparse(d) for d in node.decorator_list
            ):
                ids.append(f"{relative}::{node.name}")
    return ids


def plan_cuda_tests(ctx: Context) -> list[Run]:
    report = ctx.out / "cuda_tests.xml"
    argv = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *gpu_gated_tests()]
    return [Run("pytest", argv, 110)]


def figures_cuda_tests(ctx: Context, runs: list[dict]) -> dict:
    report = ctx.out / "cuda_tests.xml"
    if not report.is_file():
        return {}
    text = report.read_text()
    found = re.search(r'<testsuite [^>]*errors="(\d+)" failures="(\d+)" skipped="(\d+)" tests="(\d+)"', text)
    if not found:
        return {}
    errors, failures, skipped, tests = map(int, found.groups())
    return {
        "tests": tests,
        "passed": tests - errors - failures - skipped,
        "failed": errors + failures,
        "skipped": skipped,
    }


SMOKE_BF16 = [
    "--training.mixed_precision",
    "bf16",
    "--model.attention",
    "flex",
    "--activation_checkpoint.mode",
    "selective",
]
SMOKE_SHAPE = ["--training.seq_len", "2048", "--training.local_batch_size", "4"]


def plan_smoke(ctx: Context) -> list[Run]:
    runs = [
        lockstep_train(ctx, "bf16_flex_selective_ac", "llama3_debug", *SMOKE_BF16, *SMOKE_SHAPE),
        lockstep_train(ctx, "bf16_flex_selective_ac_compiled", "llama3_debug", *SMOKE_BF16, *SMOKE_SHAPE, "--compile.enable", timeout_s=90),
        lockstep_train(ctx, "deterministic_a", "llama3_debug", *SMOKE_BF16, *SMOKE_SHAPE, "--debug.deterministic"),
        lockstep_train(ctx, "deterministic_b", "llama3_debug", *SMOKE_BF16, *SMOKE_SHAPE, "--debug.deterministic"),
    ]  # fmt: skip
    moe = ["--training.mixed_precision", "bf16", "--training.seq_len", "1024", "--training.local_batch_size", "4"]
    ep = ["--parallelism.expert_parallel_degree", "2"] if ctx.gpus >= 2 else []
    nproc = 2 if ctx.gpus >= 2 else 1
    runs.append(lockstep_train(ctx, "deepseek_ep_canonical", "deepseek_v3_debug", *moe, *ep, nproc=nproc))
    runs.append(
        lockstep_train(
            ctx,
            "deepseek_ep_plain",
            "deepseek_v3_debug",
            *moe,
            *ep,
            "--debug.no-layout-invariant-reductions",
            nproc=nproc,
        )
    )
    if ctx.gpus >= 2:
        runs.append(
            lockstep_train(
                ctx,
                "tp2",
                "llama3_debug",
                *SMOKE_BF16,
                *SMOKE_SHAPE,
                "--parallelism.tensor_parallel_degree",
                "2",
                nproc=2,
            )
        )
        runs.append(
            lockstep_train(
                ctx,
                "pp2",
                "llama3_debug",
                *SMOKE_BF16,
                *SMOKE_SHAPE,
                "--parallelism.pipeline_parallel_degree",
                "2",
                nproc=2,
            )
        )
    return runs


def figures_smoke(ctx: Context, runs: list[dict]) -> dict:
    figures = {}
    for run in runs:
        if run["status"] == "passed":
            record = last_record(run["run"])
            figures[run["run"].label] = {
                "tokens_per_sec": record.get("tokens_per_sec"),
                "mfu_percent": record.get("mfu"),
                "max_memory_allocated_gib": record.get("memory_gib"),
                "estimate_gib": estimate(ctx, run["run"]),
            }
    by_label = {run["run"].label: run for run in runs}
    if all(by_label[k]["status"] == "passed" for k in ("deterministic_a", "deterministic_b")):
        a, b = losses(by_label["deterministic_a"]["run"]), losses(by_label["deterministic_b"]["run"])
        figures["deterministic_twice_bitwise"] = bool(a) and a == b
    return figures


ONE_B = ["--training.mixed_precision", "bf16", "--training.seq_len", "2048", "--training.local_batch_size", "2",
         "--model.tokenizer", "builtin", "--model.tokenizer_path=", "--training.dataset", "builtin",
         "--training.dataset_path=", "--activation_checkpoint.mode", "selective",
         "--activation_checkpoint.selective_ac_option", "op", "--model.attention", "sdpa"]  # fmt: skip
"""Llama 3 1B as both trainers run it: torchtitan's default attention (SDPA, causal), op-level selective AC,
no compile, the built-in 2,048-token tokenizer on both sides."""

TITAN_FLAVOR = '''"""Registers lockstep's Llama 3 1B shape with torchtitan (loaded by --experimental.custom_import)."""
from torchtitan.models.llama3 import llama3_args
from torchtitan.models.llama3.model.args import TransformerModelArgs

llama3_args["lockstep_1b"] = TransformerModelArgs(
    dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256, vocab_size=2048,
    rope_theta=500000,
)
'''

DATASETS_STAND_IN = '''"""A stand-in for Hugging Face datasets, for torchtitan's text loader only, used when the GPU machine has no
datasets (it needs pyarrow and pandas, too large to carry): JSON lines with a "text" field, in order."""
import json
from pathlib import Path


class Dataset:
    def __init__(self, rows):
        self.rows = list(rows)

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def skip(self, n):
        return Dataset(self.rows[n:])


def load_dataset(path, split="train", **kwargs):
    files = sorted(Path(path).glob("*.json*")) if Path(path).is_dir() else [Path(path)]
    return Dataset(json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip())
'''

DATASETS_DISTRIBUTED_STAND_IN = """def split_dataset_by_node(dataset, rank, world_size):
    from datasets import Dataset

    return Dataset(dataset.rows[rank::world_size])
"""


def titan_config(ctx: Context) -> Path:
    folder = ctx.out / "torchtitan"
    config = folder / "llama3_1b.toml"
    folder.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f"""[job]
dump_folder = "{folder / "run"}"
[model]
name = "llama3"
flavor = "lockstep_1b"
hf_assets_path = "{folder / "tokenizer"}"
[training]
local_batch_size = 2
seq_len = 2048
steps = 30
dataset = "c4_test"
dataset_path = "{folder / "data"}"
[activation_checkpoint]
mode = "selective"
selective_ac_option = "op"
[compile]
enable = false
[metrics]
log_freq = 10
[experimental]
custom_import = "lockstep_titan_flavor"
"""
    )
    (folder / "lockstep_titan_flavor.py").write_text(TITAN_FLAVOR)
    return config


def plan_torchtitan(ctx: Context) -> list[Run]:
    lockstep_run = lockstep_train(ctx, "lockstep_llama3_1b", "llama3_1b", *ONE_B, steps=30, timeout_s=70)
    config = titan_config(ctx)
    prepare = [ctx.python, str(Path(__file__).resolve()), str(ctx.out), "--prepare-torchtitan"]
    titan = [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "torchtitan.train",
             "--job.config_file", str(config)]  # fmt: skip
    return [lockstep_run, Run("prepare_torchtitan", prepare, 20), Run("torchtitan_llama3_1b", titan, 90)]


def prepare_torchtitan(out: Path, stand_in: bool | None = None) -> None:
    """The tokenizer lockstep trained (its tokenizer.json), the same corpus as JSON lines, and the
    datasets stand-in when the machine has no datasets."""
    folder = out / "torchtitan"
    tokenizer = next((out / "cache").rglob("tokenizer.json"))
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    (folder / "data").mkdir(exist_ok=True)
    corpus = next((out / "cache").rglob("train.jsonl"))  # the built-in corpus: {"text": ...} per line
    (folder / "data" / "corpus.jsonl").write_bytes(corpus.read_bytes())
    if stand_in if stand_in is not None else importlib.util.find_spec("datasets") is None:
        shim = folder / "stand_ins" / "datasets"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").write_text(DATASETS_STAND_IN)
        (shim / "distributed.py").write_text(DATASETS_DISTRIBUTED_STAND_IN)


TITAN_STEP = re.compile(r"step:\s*(\d+).*?tps:\s*([\d,]+).*?tflops:\s*([\d.]+).*?mfu:\s*([\d.]+)%", re.S)


def figures_torchtitan(ctx: Context, runs: list[dict]) -> dict:
    figures = {}
    ours = next(r for r in runs if r["run"].label == "lockstep_llama3_1b")
    if ours["status"] == "passed":
        record = last_record(ours["run"])
        figures["lockstep"] = {k: record.get(k) for k in ("tokens_per_sec", "mfu", "memory_gib", "loss")}
    titan = next(r for r in runs if r["run"].label == "torchtitan_llama3_1b")
    steps = TITAN_STEP.findall(titan.get("output", ""))
    if steps:
        step, tps, tflops, mfu = steps[-1]
        figures["torchtitan"] = {
            "step": int(step),
            "tokens_per_sec": float(tps.replace(",", "")),
            "tflops": float(tflops),
            "mfu": float(mfu),
        }
    return figures


def plan_determinism(ctx: Context) -> list[Run]:
    return [
        lockstep_train(ctx, "1b_default", "llama3_1b", *ONE_B, timeout_s=50),
        lockstep_train(ctx, "1b_deterministic", "llama3_1b", *ONE_B, "--debug.deterministic", timeout_s=50),
        lockstep_train(
            ctx, "1b_plain_reductions", "llama3_1b", *ONE_B, "--debug.no-layout-invariant-reductions", timeout_s=50
        ),
    ]


def figures_determinism(ctx: Context, runs: list[dict]) -> dict:
    rates = {r["run"].label: last_record(r["run"]).get("tokens_per_sec") for r in runs if r["status"] == "passed"}
    figures = {"tokens_per_sec": rates}
    base = rates.get("1b_plain_reductions")
    for label in ("1b_default", "1b_deterministic"):
        if base and rates.get(label):
            figures[f"{label}_cost_percent"] = round(100 * (base / rates[label] - 1), 1)
    return figures


STAGES = [
    Stage("cuda_tests", 110, plan_cuda_tests, figures_cuda_tests),
    Stage("smoke", 150, plan_smoke, figures_smoke),
    Stage("torchtitan", 150, plan_torchtitan, figures_torchtitan),
    Stage("determinism", 60, plan_determinism, figures_determinism),
]


# -- running -----------------------------------------------------------------------------------------


def run_stage(ctx: Context, stage: Stage, deadline: float) -> dict:
    started = time.monotonic()
    stage_deadline = min(deadline, started + stage.budget_s)
    runs: list[dict] = []
    for run in stage.plan(ctx):
        left = stage_deadline - time.monotonic()
        if left < 5:
            runs.append({"run": run, "status": "not run: out of time"})
            continue
        env = dict(ctx.env)
        if run.label == "torchtitan_llama3_1b":
            extra = [str(ctx.out / "torchtitan"), str(ctx.out / "torchtitan" / "stand_ins")]
            env["PYTHONPATH"] = os.pathsep.join([*extra, env["PYTHONPATH"]])
        try:
            done = subprocess.run(
                run.argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=min(run.timeout_s, left)
            )
            status = "passed" if done.returncode == 0 else f"failed: exit {done.returncode}"
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            status = "timed out"
            output = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
        runs.append({"run": run, "status": status, "output": output})
    try:
        figures = stage.figures(ctx, runs)
    except Exception as error:  # noqa: BLE001 - a stage's figures must not stop the next stage
        figures = {"error": f"{type(error).__name__}: {error}"}
    failed = [r for r in runs if r["status"] != "passed"]
    return {
        "stage": stage.name,
        "status": "passed" if not failed else "failed",
        "seconds": round(time.monotonic() - started, 1),
        "budget_s": stage.budget_s,
        "figures": figures,
        "runs": [
            {
                "label": r["run"].label,
                "status": r["status"],
                "command": shlex.join(r["run"].argv),
                "output_tail": r.get("output", "")[-3000:],
            }
            for r in runs
        ],
    }


def dry_run_stage(ctx: Context, stage: Stage) -> dict:
    """Plan the stage and check each command: lockstep's arguments through its config loader (at the
    run's world size), torchtitan's TOML against its JobConfig's fields, pytest's targets exist."""
    from lockstep.config import load_config, validate_job_config

    problems = []
    runs = stage.plan(ctx)
    for run in runs:
        if run.lockstep_args is not None:
            args = list(run.lockstep_args)
            config = args[args.index("--config") + 1]
            rest = args[: args.index("--config")] + args[args.index("--config") + 2 :]
            try:
                validate_job_config(load_config(config, rest), run.nproc)
            except Exception as error:  # noqa: BLE001 - reported per run
                problems.append(f"{run.label}: {type(error).__name__}: {error}")
        elif "pytest" in run.argv:
            for node in run.argv[run.argv.index(next(a for a in run.argv if a.startswith("--junitxml"))) + 1 :]:
                if not (REPO / node.split("::")[0]).is_file():
                    problems.append(f"{run.label}: {node} does not exist")
        elif "torchtitan.train" in run.argv:
            problems += check_titan_config(Path(run.argv[-1]))
    return {"stage": stage.name, "status": "planned" if not problems else "failed", "budget_s": stage.budget_s,
            "problems": problems, "runs": [{"label": r.label, "command": shlex.join(r.argv)} for r in runs]}  # fmt: skip


def check_titan_config(config: Path) -> list[str]:
    """Every [section] key of a torchtitan TOML is a field of torchtitan's JobConfig (read from the carried
    wheel's job_config.py without importing torchtitan, whose package imports triton)."""
    with zipfile.ZipFile(WHEELS / TORCHTITAN_WHEEL) as wheel, tempfile.TemporaryDirectory() as folder:
        wheel.extractall(
            folder, [n for n in wheel.namelist() if n.startswith(("torchtitan/config/", "torchtitan/tools/"))]
        )
        saved = {name: sys.modules.get(name) for name in ("torchtitan", "torchtitan.tools", "torchtitan.tools.logging")}
        try:
            for package in ("torchtitan", "torchtitan.tools"):
                module = types.ModuleType(package)
                module.__path__ = [str(Path(folder, *package.split(".")))]
                sys.modules[package] = module
            spec = importlib.util.spec_from_file_location(
                "titan_job_config", Path(folder, "torchtitan/config/job_config.py")
            )
            job_config = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(job_config)
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
    sections = {f.name: f.default_factory for f in dataclasses.fields(job_config.JobConfig)}
    problems = []
    for section, keys in tomllib.loads(config.read_text()).items():
        if section not in sections:
            problems.append(f"torchtitan config: no section [{section}]")
            continue
        fields = {f.name for f in dataclasses.fields(sections[section]())}
        problems += [f"torchtitan config: [{section}] has no {key}" for key in keys if key not in fields]
    return problems


def write_results(out: Path, record: dict) -> None:
    (out / "results.json").write_text(json.dumps(record, indent=1, default=str))
    lines = [
        f"# GPU acceptance: {record['device']}", "",
        f"torch {record['torch']}, CUDA {record['cuda']}, Python {record['python']}, {record['gpus']} GPU(s); "
        f"{record['seconds']} s of a {record['budget_s']} s budget{' (dry run)' if record['dry_run'] else ''}", "",
        "| stage | status | seconds | budget | figures |", "|---|---|---:|---:|---|",
    ]  # fmt: skip
    for stage in record["stages"]:
        figures = json.dumps(stage.get("figures", stage.get("problems", {})), default=str)
        lines.append(
            f"| {stage['stage']} | {stage['status']} | {stage.get('seconds', '-')} | {stage['budget_s']} | `{figures}` |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="plan and check every stage; run nothing")
    parser.add_argument("--budget-s", type=int, default=TOTAL_BUDGET_S)
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STAGES])
    parser.add_argument("--prepare-torchtitan", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpus", type=int, default=None, help="plan for this many GPUs (default: those present)")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.prepare_torchtitan:
        prepare_torchtitan(out)
        return 0
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    unpacked = [] if args.dry_run else unpack_missing_wheels(out / "site")
    sys.path[:0] = [str(out / "site"), str(REPO)]
    import torch

    gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"no GPU ({platform.processor() or 'cpu'})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(out / "site"), str(REPO)]), OMP_NUM_THREADS="4")
    ctx = Context(out, gpus, sys.executable, "h200" if "H200" in name else "h100", env, args.dry_run)
    stages = [s for s in STAGES if not args.only or s.name in args.only]
    record = {
        "device": name, "gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "budget_s": args.budget_s, "dry_run": args.dry_run,
        "wheels_unpacked": unpacked, "stages": [],
    }  # fmt: skip
    if args.dry_run:
        problems = check_wheels()
        if sum(s.budget_s for s in STAGES) > args.budget_s:
            problems.append(f"stage budgets add up to {sum(s.budget_s for s in STAGES)} s, over {args.budget_s} s")
        record["problems"] = problems
        record["stages"] = [dry_run_stage(ctx, stage) for stage in stages]
    else:
        deadline = started + args.budget_s
        for stage in stages:
            record["stages"].append(run_stage(ctx, stage, deadline))
            record["seconds"] = round(time.monotonic() - started, 1)
            write_results(out, record)  # after each stage: a lease that ends early keeps what was done
    record["seconds"] = round(time.monotonic() - started, 1)
    write_results(out, record)
    failed = record.get("problems") or any(s["status"] == "failed" for s in record["stages"])
    print((out / "results.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
