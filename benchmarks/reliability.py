"""Reliability report: kill -9 at random moments, a rank killed under torchrun, and bad inputs.

1. One process, checkpoint every step: killed with SIGKILL `--kills` times in a row at random
   moments (every fourth kill lands while a save is being written: a ``.partial`` folder exists).
   Each restart must resume from a checkpoint past the previous one; the finished run must equal an
   uninterrupted run bitwise (every logged loss and grad norm, and the final weights).
2. Two ranks (``lockstep train --nproc 2``): rank 1 is killed with SIGKILL; the time until every
   other process of the run (rank 0, torchrun, the launcher) has exited is measured. The rerun
   continues, and the finished run equals an uninterrupted two-rank run bitwise.
3. Bad inputs: each case must exit 2 with one line on stderr (no traceback), execute nothing and
   leave the files it was given byte-for-byte unchanged.

    .venv/bin/python benchmarks/reliability.py [--kills 20] [--rank-kills 3] [--seed 0]

Writes benchmarks/results/reliability.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lockstep.checkpoint import folders
from lockstep.checkpoint.hf import read_model_weights
from lockstep.run.folder import read_metrics

RESULTS = Path(__file__).parent / "results"
LOCKSTEP = [sys.executable, "-m", "lockstep"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def tiny_args(folder: Path, steps: int) -> list[str]:
    return [
        "--config", "llama3_debug", "--model.flavor", "tiny", "--training.device", "cpu",
        "--training.steps", str(steps), "--training.local_batch_size", "2", "--training.seq_len", "32",
        "--training.global_batch_size", "8", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
        "--debug.seed", "7", "--debug.deterministic", "--job.dump_folder", str(folder),
        "--checkpoint.enable", "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "4",
    ]  # fmt: skip


def outcome(folder: Path) -> tuple[list[tuple], dict[str, torch.Tensor]]:
    """(step, loss, grad_norm) of every logged step, and the final checkpoint's weights."""
    metrics = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(folder)]
    final = folders.published_steps(folder / "checkpoint")[-1][1]
    return metrics, read_model_weights(final)


def bitwise_equal(a, b) -> bool:
    (metrics_a, weights_a), (metrics_b, weights_b) = a, b
    same_weights = weights_a.keys() == weights_b.keys() and all(
        torch.equal(weights_a[k], weights_b[k]) for k in weights_a
    )
    return metrics_a == metrics_b and same_weights


def newest_step(folder: Path) -> int:
    published = folders.published_steps(folder / "checkpoint")
    return published[-1][0] if published else 0


def run_to_end(command: list[str]) -> None:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")


def kill_nine_one_process(work: Path, kills: int, steps: int, rng: random.Random) -> dict:
    reference, folder = work / "reference", work / "killed"
    run_to_end([*LOCKSTEP, "train", *tiny_args(reference, steps)])
    command = [*LOCKSTEP, "train", *tiny_args(folder, steps)]
    checkpoints = folder / "checkpoint"
    attempts = []
    for attempt in range(kills):
        start_step = newest_step(folder)
        log = work / f"attempt-{attempt}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        mid_save = attempt % 4 == 1
        while process.poll() is None and newest_step(folder) == start_step:
            time.sleep(0.002)  # this attempt has resumed and saved once
        if mid_save:
            while process.poll() is None and not list(checkpoints.glob(f"*{folders.PARTIAL}")):
                time.sleep(0.0002)
        else:
            time.sleep(rng.uniform(0.0, 0.6))
        finished = process.poll() is not None
        process.send_signal(signal.SIGKILL)
        process.wait()
        landed_mid_save = bool(list(checkpoints.glob(f"*{folders.PARTIAL}")))
        loaded = re.search(r"loaded .* from \S*step-(\d+)", log.read_text())
        attempts.append(
            {
                "newest_before": start_step,
                "loaded_step": int(loaded.group(1)) if loaded else 0,
                "killed_after": newest_step(folder),
                "mid_save": landed_mid_save,
            }
        )
        if finished:
            raise RuntimeError(f"attempt {attempt} finished the run before it was killed; raise --steps")
    resumed_every_time = all(a["loaded_step"] == a["newest_before"] for a in attempts)
    progressed = all(a["killed_after"] > a["newest_before"] for a in attempts)
    run_to_end(command)
    equal = bitwise_equal(outcome(folder), outcome(reference))
    return {
        "kills": kills,
        "kills_inside_a_save": sum(a["mid_save"] for a in attempts),
        "every_restart_resumed": resumed_every_time and progressed,
        "bitwise_equal_to_uninterrupted": equal,
        "attempts": attempts,
    }


def _run_processes(folder: Path) -> dict[int, dict[str, str]]:
    """pid -> environment of every live process whose command line names `folder`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            if str(folder) not in cmdline:
                continue
            environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        found[int(entry.name)] = dict(item.partition("=")[::2] for item in environ if "=" in item)
    return found


def kill_one_rank_of_two(work: Path, kills: int, steps: int, rng: random.Random) -> dict:
    reference, folder = work / "reference2", work / "killed2"
    run_to_end([*LOCKSTEP, "train", "--nproc", "2", *tiny_args(reference, steps)])
    command = [*LOCKSTEP, "train", "--nproc", "2", *tiny_args(folder, steps)]
    exits = []
    for _ in range(kills):
        start_step = newest_step(folder)
        launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while launcher.poll() is None and newest_step(folder) == start_step:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5))
        ranks = {pid: env.get("RANK") for pid, env in _run_processes(folder).items() if env.get("RANK") is not None}
        victim = next((pid for pid, rank in ranks.items() if rank == "1"), None)
        if victim is None:
            raise RuntimeError("rank 1 not found (did the run finish? raise --steps)")
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            launcher.kill()
        while _run_processes(folder) and time.monotonic() - killed_at < 120:
            time.sleep(0.05)
        exits.append(
            {
                "seconds_until_all_exited": round(time.monotonic() - killed_at, 2),
                "launcher_exit_code": launcher.returncode,
                "left_running": len(_run_processes(folder)),
            }
        )
    run_to_end(command)
    return {
        "kills": kills,
        "max_seconds_until_all_exited": max(e["seconds_until_all_exited"] for e in exits),
        "processes_left_running": sum(e["left_running"] for e in exits),
        "bitwise_equal_to_uninterrupted": bitwise_equal(outcome(folder), outcome(reference)),
        "exits": exits,
    }


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def bad_input_cases(work: Path) -> list[tuple[str, list[str], list[Path]]]:
    """(name, lockstep arguments, paths that must stay unchanged) for each bad input."""
    cases = work / "bad"
    cases.mkdir()
    base = tiny_args(cases / "run", 2)

    def file(name: str, content: bytes) -> Path:
        path = cases / name
        path.write_bytes(content)
        return path

    bad_toml = file("bad.toml", b"[training\nsteps = 3\n")
    latin1_toml = file("latin1.toml", "[job]\ndescription = 'caf\xe9'\n".encode("latin-1"))
    broken_jsonl = file("broken.jsonl", b'{"text": "a fine record"}\n{"text": "no end\n')
    no_field = file("nofield.jsonl", b'{"body": "text under another name"}\n')
    not_string = file("notstring.jsonl", b'{"text": 42}\n')
    garbage_parquet = file("garbage.parquet", os.urandom(4096))
    garbage_tokenizer = file("tokenizer.json", b'{"model": {"type": "nonsense"')
    latin1_text = file("latin1.txt", "na\xefve caf\xe9 ".encode("latin-1") * 1000)
    empty_text = file("empty.txt", b"")
    short_text = file("short.txt", b"just a few words")
    a_file = file("dump_is_a_file", b"not a folder")

    def dataset(kind: str, path: Path) -> list[str]:
        return [*base, "--training.dataset", kind, "--training.dataset_path", str(path), "--model.tokenizer", "bytes"]

    return [
        ("malformed TOML", ["train", "--config", str(bad_toml)], [bad_toml]),
        ("non-UTF-8 TOML", ["train", "--config", str(latin1_toml)], [latin1_toml]),
        ("jsonl with a broken line", ["train", *dataset("json", broken_jsonl)], [broken_jsonl]),
        ("record without the text field", ["train", *dataset("json", no_field)], [no_field]),
        ("record whose text is not a string", ["train", *dataset("json", not_string)], [not_string]),
        ("garbage parquet", ["train", *dataset("parquet", garbage_parquet)], [garbage_parquet]),
        (
            "garbage tokenizer.json",
            ["train", *base, "--model.tokenizer", "hf", "--model.tokenizer_path", str(garbage_tokenizer)],
            [garbage_tokenizer],
        ),
        ("non-UTF-8 text", ["train", *dataset("text", latin1_text)], [latin1_text]),
        ("empty dataset", ["train", *dataset("text", empty_text)], [empty_text]),
        ("dataset shorter than one window", ["train", *dataset("text", short_text)], [short_text]),
        ("dump_folder is a file", ["train", *base, "--job.dump_folder", str(a_file)], [a_file]),
        ("unknown key", ["train", *base, "--training.stpes", "3"], []),
        ("--nproc 0", ["train", "--nproc", "0", *base], []),
        ("dataset_path with the built-in dataset", ["train", *base, "--training.dataset_path", str(short_text)], []),
        ("compare of an empty loss file", ["compare", str(empty_text), str(empty_text), "--assert-equal"], []),
        ("convert from a folder that is not Hugging Face", ["convert", "from-hf", str(cases), str(cases / "x")], []),
    ]


def bad_inputs(work: Path) -> dict:
    results = []
    for name, arguments, guarded in bad_input_cases(work):
        before = {p: _tree_digest(p) for p in guarded}
        done = subprocess.run([*LOCKSTEP, *arguments], env=ENV, capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        ok = (
            done.returncode == 2
            and len(lines) == 1
            and "Traceback" not in done.stderr
            and all(_tree_digest(p) == digest for p, digest in before.items())
        )
        results.append({"case": name, "exit_code": done.returncode, "stderr": lines[-3:], "ok": ok})
    return {"cases": len(results), "passed": sum(r["ok"] for r in results), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rank-kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("kill9", "rank", "inputs"), default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lockstep-reliability-"))
    report: dict = {"command": " ".join(sys.argv)}
    try:
        if args.only in (None, "inputs"):
            report["bad_inputs"] = bad_inputs(work)
            print(f"bad inputs: {report['bad_inputs']['passed']}/{report['bad_inputs']['cases']} refused cleanly")
            for r in report["bad_inputs"]["results"]:
                print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['case']}: exit {r['exit_code']} {r['stderr']}")
        if args.only in (None, "kill9"):
            report["kill9"] = kill_nine_one_process(work, args.kills, args.steps, rng)
            k = report["kill9"]
            print(
                f"kill -9 x{k['kills']} ({k['kills_inside_a_save']} inside a save): every restart resumed: "
                f"{k['every_restart_resumed']}; bitwise equal to uninterrupted: {k['bitwise_equal_to_uninterrupted']}"
            )
        if args.only in (None, "rank"):
            report["rank_kill"] = kill_one_rank_of_two(work, args.rank_kills, args.steps, rng)
            r = report["rank_kill"]
            print(
                f"rank 1 of 2 killed x{r['kills']}: all other processes gone within "
                f"{r['max_seconds_until_all_exited']:.1f}s (worst), left running: {r['processes_left_running']}; "
                f"rerun bitwise equal to uninterrupted: {r['bitwise_equal_to_uninterrupted']}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "reliability.json"
    if args.only is not None and out.exists():  # one part rerun: keep the others' latest figures
        report = json.loads(out.read_text()) | report
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
