"""lockstep compare takes a torchtitan run as one side: its console log (colored or not; rounded values,
so with a tolerance) or its TensorBoard folder (the fp32 values: bitwise)."""

import json

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from lockstep.tools.compare import load_series
from tests.helpers import run_cli

LOSSES = [(1, 8.123456789, 1.25), (2, 7.5, 1.0000001), (3, 7.01171875, 0.75)]
RED, GREEN, ORANGE, RESET = "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[39m"


def _lockstep_run(folder):
    folder.mkdir()
    with open(folder / "metrics.jsonl", "w") as f:
        for step, loss, norm in LOSSES:
            f.write(
                json.dumps({"step": step, "loss": float(np.float32(loss)), "grad_norm": float(np.float32(norm))}) + "\n"
            )


def test_a_torchtitan_log_is_read_with_its_colors_and_compared_within_its_rounding(tmp_path, capfd):
    lines = [f"[rank0]:[titan] 2026-12-07 INFO {RED}step: {s:2}  {GREEN}loss: {loss:8.5f}  {ORANGE}grad_norm: "
             f"{norm:7.4f}  memory:  1.20GiB(1.5%)  tps: 1,234{RESET}" for s, loss, norm in LOSSES]  # fmt: skip
    (tmp_path / "titan.log").write_text("starting\n" + "\n".join(lines) + "\ntraining completed\n")
    series = load_series(tmp_path / "titan.log")
    assert [(s, r["loss"], r["grad_norm"]) for s, r in series.items()] == [
        (1, 8.12346, 1.25),
        (2, 7.5, 1.0),
        (3, 7.01172, 0.75),
    ]
    _lockstep_run(tmp_path / "ours")
    code, _, err = run_cli(["compare", str(tmp_path / "ours"), str(tmp_path / "titan.log"), "--rtol", "1e-5"], capfd)
    assert code == 0, err
    code, _, _ = run_cli(["compare", str(tmp_path / "ours"), str(tmp_path / "titan.log"), "--assert-equal"], capfd)
    assert code != 0  # the log's rounding is not the run's value


def test_a_torchtitan_tensorboard_folder_compares_bitwise(tmp_path, capfd):
    writer = SummaryWriter(log_dir=str(tmp_path / "tb" / "20261207-0000"))
    for step, loss, norm in LOSSES:
        writer.add_scalar("loss_metrics/global_avg_loss", loss, step)
        writer.add_scalar("loss_metrics/global_max_loss", loss + 1, step)
        writer.add_scalar("grad_norm", norm, step)
    writer.close()
    _lockstep_run(tmp_path / "ours")
    code, _, err = run_cli(["compare", str(tmp_path / "ours"), str(tmp_path / "tb"), "--assert-equal"], capfd)
    assert code == 0, err
