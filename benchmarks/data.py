"""`lockstep data prepare` throughput against the raw `tokenizers` encode_batch of the same tokenizer on
all cores (measured in the same run), the scaling of workers at one tokenizer thread each, and start-up
to the first step on the prepared dataset against the built-in corpus (part "prepare"); the peak RSS of
the sample order at 10^3 and 10^10 windows (part "order"); the share of step time llama3_debug waits for
data (part "wait").

The input is generated: documents of the built-in corpus (English prose) repeated, with a counter, into
a jsonl of --mb megabytes. The tokenizer is the built-in 2k BPE.

    .venv/bin/python benchmarks/data.py [--mb 200] [--work /tmp/lockstep-data-bench] [--parts prepare,order,wait]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate(path: Path, megabytes: int, cache: str) -> int:
    """A jsonl of about `megabytes` MB from the built-in corpus's documents; its size in bytes."""
    from lockstep.data.corpus import builtin_corpus

    texts = [json.loads(line)["text"] for line in builtin_corpus(cache).train_path.read_text().splitlines()]
    target, written, copy = megabytes * 1_000_000, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for text in texts:
                line = json.dumps({"text": f"[{copy}] {text}"}) + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= target:
                    break
            copy += 1
    return path.stat().st_size


def raw_encode_batch(path: Path, tokenizer_file: Path) -> dict:
    """The `tokenizers` library alone: encode_batch over every text (read beforehand, not timed) on its
    default thread pool (all cores), 1024 documents a call."""
    from tokenizers import Tokenizer

    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), 1024):
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch(texts[i : i + 1024], add_special_tokens=False))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens}


def prepare(path: Path, out: Path, cache: str, *options: str) -> dict:
    """`lockstep data prepare` as a user runs it (a fresh process); its wall time and token count."""
    command = [sys.executable, "-m", "lockstep", "data", "prepare", "--dataset", "json"]
    command += ["--dataset-path", str(path), "--tokenizer", "builtin", "--out", str(out), "--no-progress", *options]
    env = {**os.environ, "LOCKSTEP_CACHE": cache}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": json.loads((out / "manifest.json").read_text())["num_tokens"]}


def startup(cache: str, run: Path, *dataset: str) -> float:
    """Seconds from `lockstep train` starting to its first (and only) step done, warm caches."""
    command = [sys.executable, "-m", "lockstep", "train", "--config", "llama3_debug", "--training.steps", "1"]
    command += ["--training.device", "cpu", "--checkpoint.enable=false", "--job.dump_folder", str(run), *dataset]
    env = {**os.environ, "LOCKSTEP_CACHE": cache}
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


ORDER_PROBE = """
import resource, sys, numpy as np
from lockstep.data.order import SampleOrder
order = SampleOrder(seed=1, num_windows=int(sys.argv[1]))
for start in range(0, 10**6, 10**4):  # a million samples, in step-sized requests
    order.windows_of(range(start, start + 10**4))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def sample_order_rss() -> dict:
    """Peak RSS (MiB) of a process that draws a million samples from an order of 10^3 and of 10^10 windows."""
    rows = {}
    for windows in (10**3, 10**10):
        out = subprocess.run(
            [sys.executable, "-c", ORDER_PROBE, str(windows)], capture_output=True, text=True, check=True
        )
        rows[f"sample_order_peak_rss_mib {windows:.0e}"] = float(out.stdout.strip())
        print(
            f"sample order, {windows:.0e} windows: peak RSS {rows[f'sample_order_peak_rss_mib {windows:.0e}']:.1f} MiB"
        )
    return rows


def data_wait(work: Path, steps: int = 60) -> dict:
    """The loader's share of step time: data_wait_s summed over the run against its elapsed_s."""
    run = work / "wait-run"
    command = [
        sys.executable, "-m", "lockstep.train", "--config", "llama3_debug", "--job.dump_folder", str(run),
        "--training.steps", str(steps), "--training.device", "cpu", "--metrics.log_freq", "10",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "2"})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    waited, elapsed = sum(r["data_wait_s"] for r in records), records[-1]["elapsed_s"]
    print(
        f"llama3_debug, {steps} steps: waited {waited:.3f} s for data of {elapsed:.1f} s ({100 * waited / elapsed:.2f}%)"
    )
    return {"data_wait_s": waited, "elapsed_s": elapsed, "data_wait_share": waited / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the generated jsonl")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lockstep-data-bench"), help="scratch folder")
    parser.add_argument("--parts", default="prepare,order,wait", help="which measurements (comma-separated)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"prepare"}:
        args.work.mkdir(parents=True, exist_ok=True)
        rows = sample_order_rss() if "order" in parts else {}
        rows |= data_wait(args.work) if "wait" in parts else {}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "data_order_wait.json").write_text(json.dumps(rows, indent=2))
    if "prepare" not in parts:
        return
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    cache = str(args.work / "cache")
    from lockstep.config.sections import DataConfig, ModelConfig
    from lockstep.data.prepare import available_cores
    from lockstep.data.tokenizer import build_tokenizer

    tokenizer_file = build_tokenizer(ModelConfig(), DataConfig(cache_folder=cache)).path
    data = args.work / "data.jsonl"
    size = generate(data, args.mb, cache)
    cores = available_cores()
    print(f"{size / 1e6:.0f} MB of jsonl, built-in BPE tokenizer, {cores} cores", flush=True)

    rows = {"input_mb": size / 1e6, "cores": cores}
    runs = [
        ("raw encode_batch, all cores", None),
        (f"prepare, default workers ({cores} x 1 thread)", ()),
        ("prepare, 1 worker x 1 thread", ("--workers", "1", "--tokenizer-threads", "1")),
    ]
    if cores != 2:
        runs.append(("prepare, 2 workers x 1 thread", ("--workers", "2", "--tokenizer-threads", "1")))
    for index, (name, options) in enumerate(runs):
        if options is None:
            result = raw_encode_batch(data, tokenizer_file)
        else:
            result = prepare(data, args.work / f"prepared-{index}", cache, *options)
        result |= {"mb_per_s": size / 1e6 / result["seconds"], "tokens_per_s": result["tokens"] / result["seconds"]}
        rows[name] = result
        print(f"{name:<40} {result['mb_per_s']:6.2f} MB/s  {result['tokens_per_s']:>12,.0f} tokens/s", flush=True)
    raw, default = rows[runs[0][0]], rows[runs[1][0]]
    two = rows.get("prepare, 2 workers x 1 thread", default)
    rows["default_vs_raw"] = default["mb_per_s"] / raw["mb_per_s"]
    rows["two_vs_one_worker"] = two["mb_per_s"] / rows[runs[2][0]]["mb_per_s"]
    print(f"default workers / raw encode_batch: {rows['default_vs_raw']:.2f}x (target >= 0.85x)")
    print(f"2 workers / 1 worker at 1 tokenizer thread: {rows['two_vs_one_worker']:.2f}x")

    prepared = args.work / "prepared-1"
    for name, dataset in (
        ("builtin corpus", ()),
        (f"prepared {size / 1e6:.0f} MB", ("--training.dataset", "prepared", "--training.dataset_path", str(prepared))),
    ):
        startup(cache, args.work / "run", *dataset)  # warm: the built-in corpus is tokenized into the cache once
        seconds = min(startup(cache, args.work / "run", *dataset) for _ in range(2))
        rows[f"startup_s {name}"] = seconds
        print(f"start-up to first step, {name:<20} {seconds:6.2f} s", flush=True)
    builtin, ours = (rows[k] for k in rows if k.startswith("startup_s"))
    rows["startup_prepared_vs_builtin"] = ours / builtin
    print(f"start-up prepared / builtin: {rows['startup_prepared_vs_builtin']:.2f}x (target <= 1.5x)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data.json").write_text(json.dumps(rows, indent=2))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
