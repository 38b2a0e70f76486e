"""Fault tolerance (torchft replica groups) on llama3_debug, one thread per process, CPU: what it costs
per step, how long a kill stalls the surviving group, how long a restarted group takes to heal, and
(--fsdp-check) that groups of two FSDP ranks survive a kill bitwise. The lighthouse runs in this process.

Part "overhead": the median steady-state step time (consecutive ``elapsed_s`` of metrics.jsonl, logged
every step; the first --skip steps dropped; --repeats runs of each layout in turn, pooled) of
  (a) two replica groups of one process each, fault tolerance on (global batch 2 x local batch),
      against (b) ``lockstep train --nproc 2`` DDP (dp_replicate 2), the same global batch, no FT;
  (c) one group alone (group_size 1), fault tolerance on, against (d) one plain process.
Part "recovery": two groups; group 1 is killed (SIGKILL) once it has logged --kill-after steps, up to
--kill-jitter-s later (--seed). This process polls group 0's metrics.jsonl and timestamps the first step
record that appears after the kill and the first one computed without group 1 (ft/participants 1). The
lighthouse forms a quorum without group 1 only once its heartbeat is --heartbeat-ms old (a quorum needs
more than half of the heartbeating groups), which dominates the figure; faults.jsonl's "uncommitted"
and "quorum" times break it down. Group 1 is then restarted with the same command: the "seconds" of its
"heal" event (its whole quorum call, which received the live state) and the wall time from the restart
to its first committed step.

--fsdp-check: two groups of two ranks each (``lockstep train --nproc 2`` with dp_shard 2; each launch is
torchrun --standalone, whose rendezvous takes a free port, so each group gets its own MASTER_PORT and
nothing needs setting); group 1 is killed mid-run (all its processes, or with --fsdp-kill rank its rank
1 only, torchrun then ending the rest) and restarted. PASS when every step group 0 logged and every step
group 1 logged after it healed equal a one-process run of the same global batch bitwise (loss,
grad_norm, param and grad fingerprints), group 0 logged every step and group 1 healed.

    .venv/bin/python benchmarks/fault_tolerance.py [--parts overhead recovery] [--repeats 2] [--steps 40]
        [--seq-len 128] [--local-batch 2] [--heartbeat-ms 1000] [--out benchmarks/results/fault_tolerance.json]
    .venv/bin/python benchmarks/fault_tolerance.py --fsdp-check [--fsdp-kill group|rank]
        [--out benchmarks/results/fault_tolerance_fsdp.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
ENV = os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
GROUP_ENV = "LOCKSTEP_BENCH_GROUP"
"""Set in each group's launcher environment (torchrun copies it into the ranks) to find its processes."""
LAUNCHED: list[subprocess.Popen] = []
COMPARED = ("loss", "grad_norm", "param_fingerprint", "grad_fingerprint")
LAYOUTS = {
    "ft_2_groups": "2 replica groups x 1 process, FT",
    "ddp_2_processes": "DDP, 2 processes (--nproc 2)",
    "ft_1_group": "1 replica group, FT",
    "plain_1_process": "1 plain process",
}


class Lighthouse:
    """torchft's lighthouse in this process, on a free port of the loopback."""

    def __init__(self, heartbeat_ms: int, join_ms: int) -> None:
        os.environ.setdefault("RUST_LOG", "warn")  # its per-quorum INFO lines (the groups' logs keep theirs)
        from torchft.coordination import LighthouseServer

        self.server = LighthouseServer(
            bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=join_ms, heartbeat_timeout_ms=heartbeat_ms
        )
        self.address = f"http://127.0.0.1:{self.server.address().rsplit(':', 1)[1]}"

    def __enter__(self) -> Lighthouse:
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()


def train_args(args, folder: Path, steps: int, global_batch: int, *extra: str) -> list[str]:
    return [
        "--config", "llama3_debug", "--model.flavor", args.flavor, "--training.device", "cpu",
        "--training.seq_len", str(args.seq_len), "--training.local_batch_size", str(args.local_batch),
        "--training.global_batch_size", str(global_batch), "--training.steps", str(steps),
        "--metrics.log_freq", "1", "--job.dump_folder", str(folder), *extra,
    ]  # fmt: skip


def ft_args(lighthouse: str, replica: int, groups: int, timeout_s: float) -> list[str]:
    return [
        "--fault_tolerance.enable", "--fault_tolerance.group_size", str(groups),
        "--fault_tolerance.replica_id", str(replica), "--fault_tolerance.lighthouse", lighthouse,
        "--fault_tolerance.timeout_s", str(timeout_s),
    ]  # fmt: skip


def launch(arguments: list[str], log: Path, nproc: int = 1, group: int | None = None) -> subprocess.Popen:
    """`lockstep train` as a user starts it (through `--nproc` when nproc > 1), output to `log`."""
    command = [sys.executable, "-m", "lockstep", "train", *arguments]
    if nproc > 1:
        command[4:4] = ["--nproc", str(nproc)]
    env = ENV | ({GROUP_ENV: str(group)} if group is not None else {})
    with open(log, "a") as out:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    LAUNCHED.append(process)
    return process


def stop_leftovers() -> None:
    """After a failed part: SIGKILL what this script started and is still running (the launchers, and
    the ranks of the FSDP groups, found by their marker)."""
    for process in LAUNCHED:
        if process.poll() is None:
            process.kill()
            process.wait()
    for group in (0, 1):
        for pid in fsdp_processes(group):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"{log} did not finish within {timeout:.0f} s:\n{log.read_text()[-3000:]}") from None
    return code


def run_to_end(arguments: list[str], log: Path, nproc: int = 1) -> None:
    code = finish(launch(arguments, log, nproc), log)
    if code != 0:
        raise RuntimeError(f"lockstep train exited {code}:\n{log.read_text()[-3000:]}")


def records(path: Path) -> list[dict]:
    """The step records of a metrics.jsonl (a line still being written is left out)."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in found if "loss" in r]


def events(folder: Path) -> list[dict]:
    path = folder / "faults.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def wait_for(condition, timeout: float, what: str, processes=(), poll: float = 0.005):
    """Poll `condition()` until it returns something truthy (returned); fails after `timeout` seconds or
    when one of `processes` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if any(p.poll() is not None for p in processes):
            raise RuntimeError(f"a process exited while waiting for {what}")
        time.sleep(poll)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def step_times(recs: list[dict], skip: int, participants: int | None = None) -> list[float]:
    """Seconds of each steady step: the elapsed_s difference of consecutive logged steps after `skip`
    (with fault tolerance, both computed by `participants` groups)."""
    by_step = {r["step"]: r for r in recs}
    times = []
    for step in sorted(by_step):
        before = by_step.get(step - 1)
        if step <= skip or before is None:
            continue
        if participants is not None and not (
            by_step[step].get("ft/participants") == before.get("ft/participants") == participants
        ):
            continue
        times.append(by_step[step]["elapsed_s"] - before["elapsed_s"])
    return times


def summary(times: list[float]) -> dict:
    if not times:
        raise RuntimeError("no steady-state step was logged; raise --steps")
    return {
        "median_step_s": statistics.median(times),
        "mean_step_s": statistics.mean(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "steps_measured": len(times),
    }


def overhead(args, work: Path) -> dict:
    """The four layouts, --repeats times in turn; each layout's steady step times pooled over its runs."""
    batch, steps = args.local_batch, args.steps
    times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    medians: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    one_participant_steps = 0
    for repeat in range(args.repeats):
        # (a) two replica groups of one process each
        folder, logs = work / f"ft2-{repeat}", [work / f"ft2-{repeat}-{r}.log" for r in range(2)]
        with Lighthouse(args.heartbeat_ms, args.join_ms) as lighthouse:
            groups = [
                launch(
                    train_args(args, folder, steps, 2 * batch, *ft_args(lighthouse.address, r, 2, args.ft_timeout_s)),
                    logs[r],
                )
                for r in range(2)
            ]
            for r, g in enumerate(groups):
                if finish(g, logs[r]) != 0:
                    raise RuntimeError(f"group {r} failed:\n{logs[r].read_text()[-3000:]}")
        group0 = records(folder / "replica_0" / "metrics.jsonl")
        one_participant_steps += sum(r["ft/participants"] == 1 for r in group0)
        runs = {"ft_2_groups": step_times(group0, args.skip, participants=2)}
        # (b) DDP over two processes, the same global batch
        folder = work / f"ddp2-{repeat}"
        replicate = ["--parallelism.data_parallel_replicate_degree", "2"]
        run_to_end(train_args(args, folder, steps, 2 * batch, *replicate), work / f"ddp2-{repeat}.log", nproc=2)
        runs["ddp_2_processes"] = step_times(records(folder / "metrics.jsonl"), args.skip)
        # (c) one group alone, fault tolerance on
        folder = work / f"ft1-{repeat}"
        with Lighthouse(args.heartbeat_ms, args.join_ms) as lighthouse:
            alone = ft_args(lighthouse.address, 0, 1, args.ft_timeout_s)
            run_to_end(train_args(args, folder, steps, batch, *alone), work / f"ft1-{repeat}.log")
        runs["ft_1_group"] = step_times(records(folder / "replica_0" / "metrics.jsonl"), args.skip, 1)
        # (d) one plain process
        folder = work / f"plain1-{repeat}"
        run_to_end(train_args(args, folder, steps, batch), work / f"plain1-{repeat}.log")
        runs["plain_1_process"] = step_times(records(folder / "metrics.jsonl"), args.skip)
        for layout, run in runs.items():
            times[layout] += run
            medians[layout].append(statistics.median(run) if run else None)
    results: dict = {layout: summary(times[layout]) | {"median_step_s_per_run": medians[layout]} for layout in LAYOUTS}
    results["ft_2_groups"]["group_0_steps_with_1_participant"] = one_participant_steps
    for ft, base in (("ft_2_groups", "ddp_2_processes"), ("ft_1_group", "plain_1_process")):
        results[f"{ft}_overhead_percent"] = 100 * (results[ft]["median_step_s"] / results[base]["median_step_s"] - 1)
    return results


def first_new_record(path: Path, after_step: int, condition=lambda r: True):
    """(this moment, the record) for the first record past `after_step` that meets `condition`."""
    for record in records(path):
        if record["step"] > after_step and condition(record):
            return time.time(), record
    return None


def recovery(args, work: Path, rng: random.Random) -> dict:
    batch, steps = args.local_batch, args.recovery_steps
    folder = work / "recovery"
    m0, m1 = (folder / f"replica_{r}" / "metrics.jsonl" for r in range(2))
    logs = [work / f"recovery-{r}.log" for r in range(2)]
    with Lighthouse(args.heartbeat_ms, args.join_ms) as lighthouse:

        def group(replica: int) -> subprocess.Popen:
            extra = ft_args(lighthouse.address, replica, 2, args.ft_timeout_s)
            return launch(train_args(args, folder, steps, 2 * batch, *extra), logs[replica])

        g0, g1 = group(0), group(1)
        first = wait_for(lambda: records(m1), 120, "group 1's first step", (g0, g1))[0]["step"]
        wait_for(lambda: first_new_record(m1, first + args.kill_after - 1), 120, "group 1's steps", (g0, g1))
        time.sleep(rng.uniform(0, args.kill_jitter_s))  # somewhere inside a step
        last0 = max(r["step"] for r in records(m0))
        last1 = max(r["step"] for r in records(m1))
        killed_at = time.time()
        g1.send_signal(signal.SIGKILL)
        next_at, next_record = wait_for(lambda: first_new_record(m0, last0), 120, "group 0's next step", (g0,))
        alone_at, alone_record = wait_for(
            lambda: first_new_record(m0, last0, lambda r: r["ft/participants"] == 1), 120, "group 0 alone", (g0,)
        )
        g1.wait()
        time.sleep(args.restart_delay_s)
        restarted_at = time.time()
        g1 = group(1)  # the same command, into the same run folder
        healed_at, healed_record = wait_for(
            lambda: first_new_record(m1, last1), 180, "group 1's first step again", (g1,)
        )
        codes = [finish(g, log) for g, log in zip((g0, g1), logs, strict=True)]
    faults0, faults1 = events(folder / "replica_0"), events(folder / "replica_1")
    after_kill = [e for e in faults0 if e["time"] >= killed_at]
    uncommitted = next((e for e in after_kill if e["event"] == "uncommitted"), None)
    quorum_alone = next((e for e in after_kill if e["event"] == "quorum" and e["participants"] == [0]), None)
    quorum_both = next((e for e in after_kill if e["event"] == "quorum" and e["participants"] == [0, 1]), None)
    heals = [e for e in faults1 if e["event"] == "heal" and e["time"] >= restarted_at]
    by_step = {r["step"]: r for r in records(m0)}
    # group 0's step time while it serves the heal (the step after the quorum that took group 1 back in)
    serve_step = quorum_both["step"] if quorum_both else None
    serve_s = None
    if serve_step in by_step and serve_step - 1 in by_step:
        serve_s = by_step[serve_step]["elapsed_s"] - by_step[serve_step - 1]["elapsed_s"]
    alone = step_times(records(m0), 0, participants=1)
    group1 = {r["step"]: r for path in sorted(m1.parent.glob("metrics*.jsonl")) for r in records(path)}
    common = sorted(set(by_step) & set(group1))
    disagree = [s for s in common if any(by_step[s][k] != group1[s][k] for k in ("loss", "grad_norm"))]
    return {
        "heartbeat_timeout_ms": args.heartbeat_ms,
        "join_timeout_ms": args.join_ms,
        "exit_codes": codes,
        "killed_after_group_1_step": last1,
        "kill_to_next_group_0_step_s": next_at - killed_at,
        "next_group_0_step": next_record["step"],
        "next_group_0_step_participants": next_record["ft/participants"],
        "kill_to_first_step_without_group_1_s": alone_at - killed_at,
        "first_step_without_group_1": alone_record["step"],
        "kill_to_uncommitted_s": uncommitted["time"] - killed_at if uncommitted else None,
        "uncommitted_error": uncommitted.get("error") if uncommitted else None,
        "kill_to_quorum_without_group_1_s": quorum_alone["time"] - killed_at if quorum_alone else None,
        "group_0_alone_median_step_s": statistics.median(alone) if alone else None,
        "restart_delay_s": args.restart_delay_s,
        "heal_seconds": heals[0]["seconds"] if heals else None,
        "healed_at_step": heals[0]["step"] if heals else None,
        "restart_to_heal_event_s": heals[0]["time"] - restarted_at if heals else None,
        "restart_to_first_committed_step_s": healed_at - restarted_at,
        "first_step_after_restart": healed_record["step"],
        "group_0_step_serving_the_heal_s": serve_s,
        "group_0_every_step": sorted(by_step) == list(range(min(by_step), steps + 1)),
        "steps_both_groups_logged": len(common),
        "steps_where_the_groups_disagree": disagree,  # loss or grad_norm, bitwise
        "faults_group_0": faults0,
        "faults_group_1": faults1,
    }


def fsdp_processes(group: int) -> list[int]:
    """Pids of every process of one replica group (its launcher and ranks), by the marker in their environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{GROUP_ENV}={group}".encode() in environ:
            found.append(int(entry.name))
    return found


def rank_pid(group: int, rank: int) -> int | None:
    for pid in fsdp_processes(group):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    return None


def fsdp_check(args, work: Path, rng: random.Random) -> dict:
    batch, steps = args.local_batch, args.fsdp_steps
    global_batch = 2 * 2 * batch  # two groups of two FSDP ranks
    fingerprints = ["--debug.fingerprint"]
    reference = work / "reference"
    started = time.monotonic()
    run_to_end(train_args(args, reference, steps, global_batch, *fingerprints), work / "reference.log")
    reference_s = time.monotonic() - started
    expected = {r["step"]: r for r in records(reference / "metrics.jsonl")}
    folder = work / "fsdp"
    m0, m1 = (folder / f"replica_{r}" / "metrics.jsonl" for r in range(2))
    logs = [work / f"fsdp-{r}.log" for r in range(2)]
    shard = ["--parallelism.data_parallel_shard_degree", "2", *fingerprints]
    with Lighthouse(args.heartbeat_ms, args.join_ms) as lighthouse:

        def group(replica: int) -> subprocess.Popen:
            extra = [*shard, *ft_args(lighthouse.address, replica, 2, args.ft_timeout_s)]
            return launch(train_args(args, folder, steps, global_batch, *extra), logs[replica], 2, replica)

        g0, g1 = group(0), group(1)
        first = wait_for(lambda: records(m1), 180, "group 1's first step", (g0, g1))[0]["step"]
        wait_for(lambda: first_new_record(m1, first + args.kill_after - 1), 120, "group 1's steps", (g0, g1))
        time.sleep(rng.uniform(0, args.kill_jitter_s))
        last0 = max(r["step"] for r in records(m0))
        last1 = max(r["step"] for r in records(m1))
        if args.fsdp_kill == "rank":
            victims = [rank_pid(1, 1)]
        else:  # the whole group: the launcher (torchrun's agent runs in it) and both ranks
            victims = [g1.pid] + [p for p in fsdp_processes(1) if p != g1.pid]
        if None in victims:
            raise RuntimeError("group 1's rank 1 was not found")
        killed_at = time.time()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        seen: dict[str, float] = {}

        def recovered():  # group 0 stepped without group 1, and every process of group 1 has exited
            now = time.time()
            if "alone" not in seen and (found := first_new_record(m0, last0, lambda r: r["ft/participants"] == 1)):
                seen["alone"], seen["alone_step"] = found[0], found[1]["step"]
            if "launcher" not in seen and g1.poll() is not None:
                seen["launcher"] = now
            if "launcher" in seen and "gone" not in seen and not fsdp_processes(1):
                seen["gone"] = now
            return len(seen) == 4

        wait_for(recovered, 240, "group 0 alone and group 1 gone", (g0,), poll=0.01)
        restarted_at = time.time()
        g1 = group(1)
        healed_at, _ = wait_for(lambda: first_new_record(m1, last1), 240, "group 1's first step again", (g1,))
        codes = [finish(g, log) for g, log in zip((g0, g1), logs, strict=True)]
    got0 = {r["step"]: r for r in records(m0)}
    got1 = {r["step"]: r for r in records(m1)}
    heals = [e for e in events(folder / "replica_1") if e["event"] == "heal" and e["time"] >= restarted_at]
    healed_step = heals[0]["step"] if heals else None

    def mismatches(got: dict[int, dict]) -> list[int]:
        return [s for s, r in got.items() if any(r[k] != expected[s][k] for k in COMPARED)]

    bad0, bad1 = mismatches(got0), mismatches(got1)
    every_step0 = sorted(got0) == list(range(min(got0), steps + 1))
    after_heal1 = healed_step is not None and all(s in got1 for s in range(healed_step + 1, steps + 1))
    passed = codes == [0, 0] and not bad0 and not bad1 and every_step0 and after_heal1
    return {
        "passed": passed,
        "kill": args.fsdp_kill,
        "steps": steps,
        "global_batch": global_batch,
        "exit_codes": codes,
        "reference_s": reference_s,
        "group_0_steps_compared": len(got0),
        "group_0_mismatched_steps": bad0,
        "group_0_first_step": min(got0),
        "group_0_every_step_from_its_first": every_step0,
        "group_1_steps_compared": len(got1),
        "group_1_mismatched_steps": bad1,
        "group_1_healed_at_step": healed_step,
        "group_1_trained_every_step_after_heal": after_heal1,
        "killed_after_group_1_step": last1,
        "kill_to_first_step_without_group_1_s": seen["alone"] - killed_at,
        "first_step_without_group_1": seen["alone_step"],
        "kill_to_group_1_launcher_exit_s": seen["launcher"] - killed_at,
        "kill_to_every_group_1_process_gone_s": seen["gone"] - killed_at,
        "heal_seconds": heals[0]["seconds"] if heals else None,
        "restart_to_heal_event_s": heals[0]["time"] - restarted_at if heals else None,
        "restart_to_first_committed_step_s": healed_at - restarted_at,
        "steps_group_0_alone": sum(r["ft/participants"] == 1 for r in got0.values()),
        "faults_group_0": events(folder / "replica_0"),
        "faults_group_1": events(folder / "replica_1"),
    }


def print_overhead(o: dict) -> None:
    for name, label in LAYOUTS.items():
        r = o[name]
        print(
            f"{label:<34} median step {r['median_step_s'] * 1000:7.1f} ms  (mean {r['mean_step_s'] * 1000:.1f}, "
            f"min {r['min_step_s'] * 1000:.1f}, max {r['max_step_s'] * 1000:.1f}; {r['steps_measured']} steps)"
        )
    print(f"fault tolerance, 2 groups vs DDP 2: {o['ft_2_groups_overhead_percent']:+.1f}% step time")
    print(f"fault tolerance, 1 group vs 1 process: {o['ft_1_group_overhead_percent']:+.1f}% step time")


def print_recovery(r: dict) -> None:
    def s(value) -> str:
        return "n/a" if value is None else f"{value:.2f} s"

    print(f"lighthouse heartbeat timeout {r['heartbeat_timeout_ms']} ms, join timeout {r['join_timeout_ms']} ms")
    print(
        f"kill -> group 0's next committed step: {s(r['kill_to_next_group_0_step_s'])} "
        f"(step {r['next_group_0_step']}, {r['next_group_0_step_participants']} participant(s))"
    )
    print(
        f"kill -> first step without group 1: {s(r['kill_to_first_step_without_group_1_s'])} "
        f"(uncommitted after {s(r['kill_to_uncommitted_s'])}, quorum [0] after {s(r['kill_to_quorum_without_group_1_s'])})"
    )
    print(f"group 0 alone: median step {s(r['group_0_alone_median_step_s'])}")
    print(
        f"restart -> heal: heal event {s(r['heal_seconds'])} (at step {r['healed_at_step']}), "
        f"restart -> heal event {s(r['restart_to_heal_event_s'])}, "
        f"restart -> first committed step {s(r['restart_to_first_committed_step_s'])}"
    )
    print(f"group 0's step while serving the heal: {s(r['group_0_step_serving_the_heal_s'])}")
    print(
        f"group 0 logged every step: {r['group_0_every_step']}; the groups disagree on "
        f"{len(r['steps_where_the_groups_disagree'])} of {r['steps_both_groups_logged']} common steps; "
        f"exit codes {r['exit_codes']}"
    )


def print_fsdp(r: dict) -> None:
    print(f"{'PASS' if r['passed'] else 'FAIL'}: 2 groups x FSDP 2, group 1 killed ({r['kill']}) and restarted")
    print(
        f"group 0: {r['group_0_steps_compared']} steps, mismatched {r['group_0_mismatched_steps']}, every step "
        f"from its first ({r['group_0_first_step']}): {r['group_0_every_step_from_its_first']}; group 1: {r['group_1_steps_compared']} steps, mismatched "
        f"{r['group_1_mismatched_steps']}, healed at step {r['group_1_healed_at_step']}, every step after: "
        f"{r['group_1_trained_every_step_after_heal']}; exit codes {r['exit_codes']}"
    )
    print(
        f"kill -> first step without group 1 {r['kill_to_first_step_without_group_1_s']:.2f} s; kill -> group 1's "
        f"launcher exited {r['kill_to_group_1_launcher_exit_s']:.2f} s, every process of it "
        f"{r['kill_to_every_group_1_process_gone_s']:.2f} s"
    )
    heal = "n/a" if r["heal_seconds"] is None else f"{r['heal_seconds']:.2f} s"
    print(
        f"heal {heal} (step {r['group_1_healed_at_step']}); restart -> heal event "
        f"{r['restart_to_heal_event_s']:.2f} s, -> first committed step {r['restart_to_first_committed_step_s']:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("overhead", "recovery"), default=["overhead", "recovery"])
    parser.add_argument("--fsdp-check", action="store_true", help="run the FSDP replica-group check instead")
    parser.add_argument("--fsdp-kill", choices=("group", "rank"), default="group")
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--local-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="steps of each overhead run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each overhead layout, in turn")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the step times")
    parser.add_argument("--recovery-steps", type=int, default=80)
    parser.add_argument("--fsdp-steps", type=int, default=40)
    parser.add_argument("--kill-after", type=int, default=5, help="group 1's logged steps before the kill")
    parser.add_argument("--kill-jitter-s", type=float, default=0.2, help="kill at a random moment up to this late")
    parser.add_argument("--restart-delay-s", type=float, default=0.0, help="after group 0 has stepped alone")
    parser.add_argument("--heartbeat-ms", type=int, default=1000, help="lighthouse heartbeat timeout")
    parser.add_argument("--join-ms", type=int, default=1000, help="lighthouse join timeout")
    parser.add_argument("--ft-timeout-s", type=float, default=30.0, help="fault_tolerance.timeout_s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the run folders and logs (printed)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    name = "fault_tolerance_fsdp.json" if args.fsdp_check else "fault_tolerance.json"
    out = args.out or RESULTS / name
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lockstep-ft-bench-"))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report: dict = {"command": " ".join(sys.argv), "settings": settings}
    started = time.monotonic()
    try:
        if args.fsdp_check:
            report["fsdp_check"] = fsdp_check(args, work, rng)
            print_fsdp(report["fsdp_check"])
        else:
            if "overhead" in args.parts:
                report["overhead"] = overhead(args, work)
                print_overhead(report["overhead"])
            if "recovery" in args.parts:
                report["recovery"] = recovery(args, work, rng)
                print_recovery(report["recovery"])
    finally:
        stop_leftovers()
        if args.keep:
            print(f"run folders and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = time.monotonic() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['wall_s']:.0f} s)")
    if args.fsdp_check and not report["fsdp_check"]["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
