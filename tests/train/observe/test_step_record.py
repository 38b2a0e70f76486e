"""StepRecorder, built with no trainer: which steps it records (the same on every rank), the record's
fields and figures, the fingerprints it writes, and the interval it times."""

import json
import math

import pytest
import torch

from lockstep.config.sections import MetricsConfig
from lockstep.train.observe.fingerprint import RankFingerprints
from lockstep.train.observe.moe_balance import MoEStats
from lockstep.train.observe.step_metrics import StepMetrics
from lockstep.train.observe.step_record import StepRecorder
from lockstep.train.state import StepResult, TrainState


class FakeLoader:
    def __init__(self) -> None:
        self.waits, self.sources = [0.25], [{"web": 96}]

    def take_wait_s(self) -> float:
        return self.waits.pop(0) if self.waits else 0.0

    def take_source_tokens(self) -> dict[str, int]:
        return self.sources.pop(0) if self.sources else {}


class FakeReplicaGroups:
    participants = 2

    def record(self) -> dict[str, int]:
        return {"ft/participants": self.participants}


def _recorder(tmp_path, log_freq: int = 10, **kwargs) -> StepRecorder:
    return StepRecorder(
        MetricsConfig(log_freq=log_freq),
        loader=FakeLoader(),
        step_metrics=StepMetrics(torch.device("cpu")),
        rank_fingerprints=RankFingerprints(tmp_path, 3),
        flops_per_token=1e6,
        peak_flops=1e12,
        world_size=4,
        **kwargs,
    )


def _result(**kwargs) -> StepResult:
    result = StepResult(loss=torch.tensor(2.5), grad_norm=torch.tensor(0.5), **kwargs)
    result.loss_value, result.grad_norm_value = 2.5, 0.5
    return result


@pytest.mark.parametrize(
    ("step", "stopping", "due"),
    [(1, False, True), (2, False, False), (5, False, True), (7, False, False), (7, True, True), (20, False, True)],
)
def test_due_on_the_first_last_every_nth_and_the_stopping_step(tmp_path, step, stopping, due):
    assert _recorder(tmp_path, log_freq=5).due(step, 20, stopping) is due


def test_the_record_of_a_step(tmp_path):
    recorder = _recorder(tmp_path)
    recorder.restart_interval()
    recorder.count(1024)
    state = TrainState(step=10, tokens_seen=4096, elapsed_s=3.0)
    record = recorder.record(_result(fingerprints={"params": "ab"}), state=state, lr=1e-3)
    assert {k: record[k] for k in ("step", "loss", "grad_norm", "lr", "tokens_seen", "elapsed_s")} == {
        "step": 10, "loss": 2.5, "grad_norm": 0.5, "lr": 1e-3, "tokens_seen": 4096, "elapsed_s": 3.0,
    }  # fmt: skip
    assert record["tokens_per_sec"] > 0 and record["tflops"] == record["tokens_per_sec"] * 1e6 / 1e12
    assert math.isclose(record["mfu"], 100 * record["tflops"] * 1e12 / (1e12 * 4))
    assert record["data_wait_s"] == 0.25 and record["data/tokens/web"] == 96
    assert record["params"] == "ab" and "step_time_s" in record and "memory_gib" in record
    assert not (tmp_path / "fingerprints").exists()  # no local digests: nothing written


def test_replica_groups_scale_the_mfu_and_add_their_record(tmp_path):
    plain = _recorder(tmp_path)
    grouped = _recorder(tmp_path, replica_groups=FakeReplicaGroups())
    for recorder in (plain, grouped):
        recorder.interval_start -= 1.0
        recorder.count(10**6)
    state = TrainState(step=1)
    one, two = (r.record(_result(), state=state, lr=0.0) for r in (plain, grouped))
    assert two["ft/participants"] == 2 and "ft/participants" not in one
    assert math.isclose(two["mfu"] * 2 / two["tokens_per_sec"], one["mfu"] / one["tokens_per_sec"])  # over 2x the ranks


def test_local_digests_are_written_to_this_ranks_fingerprint_file(tmp_path):
    recorder = _recorder(tmp_path)
    digests = {"grad": {"w": "01"}, "param": {"w": "02"}}
    recorder.record(_result(local_digests=digests), state=TrainState(step=4), lr=0.0)
    line = (tmp_path / "fingerprints" / "rank3.jsonl").read_text()
    assert line == json.dumps({"step": 4, **digests}) + "\n"
    assert RankFingerprints.read(tmp_path, 3, 4) == {"step": 4, **digests}


def test_moe_statistics_without_a_group_are_this_ranks(tmp_path):
    stats = MoEStats(["layers.1"], torch.tensor([[0.5, 1.0, 2.0, 0.0]]))  # one layer, MoE.LOAD_STATS
    record = _recorder(tmp_path).moe_record(stats)
    assert record == stats.as_floats() and all(k.startswith("moe/layers.1/") for k in record)
    assert _recorder(tmp_path).moe_record(None) == {}


def test_restart_interval_forgets_the_tokens_counted(tmp_path):
    recorder = _recorder(tmp_path)
    recorder.count(100)
    recorder.restart_interval()
    assert recorder.interval_tokens == 0
