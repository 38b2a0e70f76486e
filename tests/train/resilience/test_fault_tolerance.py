"""Replica groups over torchft: a failure, a redone step or a heal does not change a committed step's bits.

Each group is a `python -m lockstep.train` process of one rank, as a user starts it; the lighthouse
runs in this process. The reference is one process training the same global batch (4 microbatches of
2 samples; each of the 2 groups computes 2 of them at full strength). Groups started together usually
begin together, but one may train alone first and the other heal when it joins: with keep_global_batch
every committed step is bitwise the reference's either way, so the tests hold whatever the timing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torchft")

from torchft.coordination import LighthouseServer  # noqa: E402

from lockstep.train.resilience.fault_tolerance import HOLD_ENV, KILL_IN_SUM_ENV  # noqa: E402
from lockstep.train.trainer import Trainer  # noqa: E402
from tests.helpers import tiny_config, tiny_overrides  # noqa: E402

GLOBAL_BATCH = ["--training.global_batch_size", "8", "--debug.fingerprint"]  # 4 microbatches of 2
COMPARED = ("loss", "grad_norm", "param_fingerprint", "grad_fingerprint")


@pytest.fixture
def lighthouse():
    server = LighthouseServer(bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=100, heartbeat_timeout_ms=2000)
    port = server.address().rsplit(":", 1)[1]
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def reference(folder: Path, steps: int) -> dict[int, dict]:
    """One process, the same global batch, no fault tolerance: the steps every group must reproduce."""
    with Trainer(tiny_config(folder, *GLOBAL_BATCH, "--training.steps", str(steps)), show_progress=False) as t:
        t.train()
    return records(folder / "run" / "metrics.jsonl")


def records(path: Path, complete: bool = True) -> dict[int, dict]:
    """Step records by step; a step written by two launches (before a kill and after a heal) must agree.
    A file still being written (not `complete`) may end in half a line."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if complete:
                raise
            continue
        if "loss" in record:
            step = record["step"]
            assert step not in by_step or all(by_step[step][k] == record[k] for k in COMPARED), step
            by_step[step] = record
    return by_step


def faults(folder: Path, replica: int) -> list[dict]:
    path = folder / "run" / f"replica_{replica}" / "faults.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_group(folder: Path, lighthouse: str, replica: int, steps: int, *extra: str, env: dict | None = None):
    command = [sys.executable, "-m", "lockstep.train", "--config", "llama3_debug"] + tiny_overrides(folder)
    command += GLOBAL_BATCH + ["--training.steps", str(steps)]
    command += ["--fault_tolerance.enable", "--fault_tolerance.group_size", "2"]
    command += ["--fault_tolerance.replica_id", str(replica), "--fault_tolerance.lighthouse", lighthouse]
    command += ["--fault_tolerance.timeout_s", "20", "--fault_tolerance.quorum_timeout_s", "60"]
    environment = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"} | (env or {})
    log = (folder / f"replica_{replica}.log").open("a")
    return subprocess.Popen(command + list(extra), env=environment, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def assert_same_steps(got: dict[int, dict], expected: dict[int, dict]) -> None:
    assert got, "no committed step was recorded"
    for step, record in got.items():
        assert {k: record[k] for k in COMPARED} == {k: expected[step][k] for k in COMPARED}, f"step {step}"


def wait_for_step(folder: Path, replica: int, step: int, process: subprocess.Popen) -> None:
    path = folder / "run" / f"replica_{replica}" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and any(r >= step for r in records(path, complete=False)):
            return
        time.sleep(0.02)
    raise AssertionError(f"replica {replica} never reached step {step}")


def test_a_killed_group_heals_from_its_peer_and_every_step_is_bitwise(tmp_path, lighthouse):
    steps, hold = 50, 35  # group 0 trains alone after the kill, then waits at step 35 for group 1 to be back
    expected = reference(tmp_path / "reference", steps)
    back = tmp_path / "group-1-is-back"
    group0 = start_group(tmp_path, lighthouse, 0, steps, env={HOLD_ENV: f"{hold}:{back}"})
    group1 = start_group(tmp_path, lighthouse, 1, steps)
    wait_for_step(tmp_path, 1, 1, group1)
    first = min(records(tmp_path / "run" / "replica_1" / "metrics.jsonl", complete=False))  # > 1: healed at start
    kill_at = first + random.Random().randint(2, 6)
    assert kill_at < hold, "group 1 joined too late for this test"
    wait_for_step(tmp_path, 1, kill_at, group1)
    group1.send_signal(signal.SIGKILL)
    assert group1.wait() == -signal.SIGKILL
    time.sleep(0.5)
    group1 = start_group(tmp_path, lighthouse, 1, steps)  # the same command, into the same run folder
    launches = tmp_path / "run" / "replica_1" / "launches"
    while len(list(launches.iterdir())) < 2 and group1.poll() is None:  # its manager heartbeats by now
        time.sleep(0.05)
    back.touch()
    assert finish(group0) == 0 and finish(group1) == 0
    got0 = records(tmp_path / "run" / "replica_0" / "metrics.jsonl")
    assert sorted(got0) == list(range(min(got0), steps + 1))  # every step from its first committed, none lost
    assert_same_steps(got0, expected)
    got1 = records(tmp_path / "run" / "replica_1" / "metrics.jsonl")
    assert_same_steps(got1, expected)
    heals = [f for f in faults(tmp_path, 1) if f["event"] == "heal"]
    assert heals and heals[-1]["step"] >= kill_at, "the restarted group did not heal from its peer"
    healed_at = heals[-1]["step"]
    launches = sorted((tmp_path / "run" / "replica_1" / "launches").iterdir())
    assert json.loads((launches[-1] / "launch.json").read_text())["healed_at"] == [healed_at]
    assert all(s in got1 for s in range(healed_at + 1, steps + 1))  # it trained every step after the heal
    quorums = [f["participants"] for f in faults(tmp_path, 0) if f["event"] == "quorum"]
    assert [0] in quorums and quorums[-1] == [0, 1]  # alone after the kill, both again after the heal
    alone = [s for s, r in got0.items() if r["ft/participants"] == 1]
    assert alone, "group 0 never trained alone"


def run_with_group1_killed_in_sum(folder: Path, lighthouse: str, steps: int, sums: int, *extra: str):
    """Both groups start; group 1 kills itself in its `sums`-th cross-group sum and group 0 finishes.
    Returns group 0's step records and the one step it recorded as uncommitted. Group 0 is held before its
    first quorum until group 1's manager heartbeats (its launch is recorded after the manager starts), so
    the lighthouse's majority rule puts both in the first quorum however slow group 1's start-up is."""
    ready = folder / "group-1-heartbeats"
    group0 = start_group(folder, lighthouse, 0, steps, *extra, env={HOLD_ENV: f"1:{ready}"})
    group1 = start_group(folder, lighthouse, 1, steps, *extra, env={KILL_IN_SUM_ENV: str(sums)})
    launches = folder / "run" / "replica_1" / "launches"
    while not (launches.is_dir() and any(launches.iterdir())) and group1.poll() is None:
        time.sleep(0.05)
    ready.touch()
    assert finish(group1) == -signal.SIGKILL
    assert finish(group0) == 0
    got0 = records(folder / "run" / "replica_0" / "metrics.jsonl")
    assert sorted(got0) == list(range(min(got0), steps + 1))  # every step from its first committed, none lost
    uncommitted = [f["step"] for f in faults(folder, 0) if f["event"] == "uncommitted"]
    assert uncommitted, "the step group 1 died in was committed"
    return got0, uncommitted[0]


def test_a_group_killed_inside_the_sum_is_redone_then_resumed_from_disk_alone(tmp_path, lighthouse):
    steps = 24
    expected = reference(tmp_path / "reference", steps)
    saving = ["--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0"]
    got0, broken = run_with_group1_killed_in_sum(tmp_path, lighthouse, steps, 3, *saving)
    assert_same_steps(got0, expected)  # the broken step was redone by group 0 alone, bitwise
    assert got0[broken]["ft/participants"] == 1 and got0[broken - 1]["ft/participants"] == 2
    # Group 1 never came back during the run. Started again, alone, it resumes from its own newest checkpoint
    # with one group instead of two, and still computes the same steps.
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "replica_1" / "checkpoint").glob("step-*"))
    assert saved and saved[-1] < broken
    group1 = start_group(tmp_path, lighthouse, 1, steps, *saving)
    assert finish(group1) == 0
    launches = sorted((tmp_path / "run" / "replica_1" / "launches").iterdir())
    assert json.loads((launches[-1] / "launch.json").read_text())["start_step"] == saved[-1]
    got1 = records(tmp_path / "run" / "replica_1" / "metrics.jsonl")
    assert_same_steps(got1, expected)
    assert all(got1[s]["ft/participants"] == 1 for s in range(saved[-1] + 1, steps + 1))


def test_without_keep_global_batch_the_step_shrinks_and_the_fault_is_recorded(tmp_path, lighthouse):
    steps = 16
    expected = reference(tmp_path / "reference", steps)
    shrink = ["--fault_tolerance.keep_global_batch", "false"]
    got0, broken = run_with_group1_killed_in_sum(tmp_path, lighthouse, steps, 2, *shrink)
    events = faults(tmp_path, 0)
    assert all(got0[s]["ft/participants"] == 1 for s in range(broken, steps + 1))
    assert any(f["event"] == "quorum" and f["participants"] == [0] for f in events)
    if all(got0[s]["ft/participants"] == 2 for s in range(min(got0), broken)) and min(got0) == 1:
        assert_same_steps({s: got0[s] for s in range(1, broken)}, expected)  # both groups: the full batch
    shrunk = {s: got0[s] for s in range(broken, steps + 1)}
    assert all(r["loss"] != expected[s]["loss"] for s, r in shrunk.items())  # torchft's way: half the batch


def test_a_lighthouse_lost_mid_run_saves_the_last_committed_step_and_says_so(tmp_path):
    """The lighthouse (`lockstep lighthouse`, its own process) is killed between steps 2 and 3 (the group is
    held before step 3's quorum until it is dead): the group saves step 2, prints one line naming the
    lighthouse and the fix, and exits 75."""
    hold = tmp_path / "lighthouse-gone"
    lighthouse = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lockstep.cli import main; sys.exit(main(sys.argv[1:]))", "lighthouse", "--port", "0", "--bind", "127.0.0.1",
         "--join-timeout-ms", "100", "--heartbeat-timeout-ms", "2000"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        port = lighthouse.stdout.readline().split()[2].rsplit(":", 1)[1]
        address = f"http://127.0.0.1:{port}"
        group = start_group(
            tmp_path, address, 0, 8, "--checkpoint.enable", "--checkpoint.interval", "100",
            "--fault_tolerance.quorum_timeout_s", "3", "--fault_tolerance.timeout_s", "3",
            env={HOLD_ENV: f"3:{hold}"},
        )  # fmt: skip
        wait_for_step(tmp_path, 0, 2, group)
    finally:
        lighthouse.kill()
        lighthouse.wait()
        hold.touch()
    assert finish(group) == 75
    log = (tmp_path / "replica_0.log").read_text()
    assert "Traceback" not in log
    [line] = [line for line in log.splitlines() if "fault_tolerance.lighthouse" in line]
    assert line.startswith("stopped after step 2, saved: ") and address in line and "rerun" in line
    steps = sorted(p.name for p in (tmp_path / "run" / "replica_0" / "checkpoint").glob("step-*"))
    assert steps == ["step-00000002"]
