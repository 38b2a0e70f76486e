"""The metric sinks: metrics.jsonl gets every record appended, strict and bit-exact; TensorBoard and
Weights & Biases (faked here) get the record's numbers at its step."""

import json
import math
import sys
from types import SimpleNamespace

from lockstep.config.sections import MetricsConfig
from lockstep.run.folder import read_metrics
from lockstep.run.metrics_file import MetricsLogger


def _logger(tmp_path, **sinks) -> MetricsLogger:
    return MetricsLogger(
        MetricsConfig(**sinks), run_folder=tmp_path, metrics_file=tmp_path / "metrics.jsonl", run_name="r"
    )


def test_records_are_appended_to_an_existing_file_never_over_it(tmp_path):
    """A resumed run's logger opens the kept metrics.jsonl: the earlier steps stay in front."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    logger = _logger(tmp_path)
    logger.log({"step": 2, "loss": 2.25})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # readable before the close
    logger.close()
    assert [r["loss"] for r in read_metrics(tmp_path)] == [2.5, 2.25]


def test_floats_round_trip_exactly_and_non_finite_values_are_strict_json(tmp_path):
    """Two runs are compared bitwise from their files: the written float is the float logged."""
    loss, grad_norm = 0.1 + 0.2, float.fromhex("0x1.fffffep-1")  # neither is a short decimal
    logger = _logger(tmp_path)
    logger.log({"step": 1, "loss": loss, "grad_norm": grad_norm, "skipped": math.nan, "inf": -math.inf})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    json.loads(line, parse_constant=lambda token: (_ for _ in ()).throw(AssertionError(f"bare {token}")))
    record = read_metrics(tmp_path)[0]
    assert record["loss"] == loss and record["grad_norm"] == grad_norm
    assert math.isnan(record["skipped"]) and record["inf"] == -math.inf


class FakeSink:
    """Stands for TensorBoard's SummaryWriter and for a wandb run: records what it is given."""

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.calls, self.closed = kwargs, [], False

    def add_scalar(self, key, value, step) -> None:
        self.calls.append((key, value, step))

    def log(self, scalars, step) -> None:
        self.calls.append((scalars, step))

    def close(self) -> None:
        self.closed = True

    finish = close


def test_the_optional_sinks_get_the_numbers_at_the_records_step(tmp_path, monkeypatch):
    """Only int and float values, never the step itself nor strings (a fingerprint is not a scalar)."""
    made = {}
    board = SimpleNamespace(SummaryWriter=lambda **kw: made.setdefault("tb", FakeSink(**kw)))
    wandb = SimpleNamespace(init=lambda **kw: made.setdefault("wandb", FakeSink(**kw)))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    logger = _logger(tmp_path, enable_tensorboard=True, enable_wandb=True)
    logger.log({"step": 5, "loss": 1.5, "tokens": 64, "param_fingerprint": "ab12"})
    logger.close()
    assert made["tb"].kwargs == {"log_dir": str(tmp_path / "tb")}
    assert made["tb"].calls == [("loss", 1.5, 5), ("tokens", 64, 5)]
    assert made["wandb"].kwargs["name"] == "r" and made["wandb"].kwargs["dir"] == str(tmp_path)
    assert made["wandb"].calls == [({"loss": 1.5, "tokens": 64}, 5)]
    assert made["tb"].closed and made["wandb"].closed
    assert read_metrics(tmp_path)[0]["param_fingerprint"] == "ab12"  # the file keeps everything
