import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from lockstep.config import load_config
from lockstep.config.sections import LRSchedulerConfig
from lockstep.run.folder import read_metrics
from lockstep.train.loss import global_batch_loss
from lockstep.train.optimizer import lr_factor
from lockstep.train.trainer import Trainer
from tests.helpers import host_reads, tiny_config, tiny_model


def _run(config) -> tuple[list[dict], dict[str, torch.Tensor]]:
    trainer = Trainer(config, show_progress=False)
    folder = trainer.train()
    return read_metrics(folder), trainer.full_weights()


def test_same_seed_runs_are_bitwise_identical(tmp_path):
    metrics_a, weights_a = _run(tiny_config(tmp_path / "a", "--debug.deterministic"))
    metrics_b, weights_b = _run(tiny_config(tmp_path / "b", "--debug.deterministic"))
    assert len(metrics_a) == 6
    assert [(m["loss"], m["grad_norm"]) for m in metrics_a] == [(m["loss"], m["grad_norm"]) for m in metrics_b]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    metrics_c, _ = _run(tiny_config(tmp_path / "c", "--debug.seed", "8"))
    assert metrics_c[0]["loss"] != metrics_a[0]["loss"]


def test_gradient_accumulation_equals_one_big_batch():
    """4 microbatches of 1 sample, each loss divided by the global token count, give the gradient
    of one batch of 4 (fp32 summation-order tolerance)."""
    model = tiny_model(vocab_size=97, seq_len=16)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 97, (4, 16), generator=gen)
    labels = torch.randint(0, 97, (4, 16), generator=gen)
    labels[1, :5] = -100  # uneven valid-token counts per microbatch
    total = int((labels != -100).sum())
    global_batch_loss(model(inputs), labels, total).backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for i in range(4):
        global_batch_loss(model(inputs[i : i + 1]), labels[i : i + 1], total).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, big[name], rtol=1e-5, atol=1e-7, msg=name)


def test_trainer_accumulates_when_global_batch_is_larger(tmp_path):
    metrics, _ = _run(tiny_config(tmp_path, "--training.global_batch_size", "8", "--training.steps", "2"))
    assert metrics[-1]["tokens_seen"] == 2 * 8 * 32


def test_short_run_on_builtin_corpus_lowers_the_loss(tmp_path):
    config = tiny_config(
        tmp_path, "--training.steps", "60", "--optimizer.lr", "0.005", "--training.local_batch_size", "4",
        "--metrics.log_freq", "10",
    )  # fmt: skip
    metrics, _ = _run(config)
    assert metrics[0]["step"] == 1 and metrics[-1]["step"] == 60
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0, [m["loss"] for m in metrics]


def test_run_folder_contract(tmp_path):
    config = tiny_config(tmp_path, "--debug.seed", "none", "--metrics.enable_tensorboard")
    trainer = Trainer(config, show_progress=False)
    folder = trainer.train()
    assert config.debug.seed is None  # the caller's config is left as it is; the trainer's is resolved
    config = trainer.config
    records = read_metrics(folder)
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_sec", "tflops", "mfu", "memory_gib", "tokens_seen"):
        assert key in records[0]
    env = json.loads((folder / "env.json").read_text())
    assert env["seeds"]["root"] == config.debug.seed  # a drawn seed is logged...
    assert env["versions"]["torch"].startswith("2.13")
    assert len(env["fingerprints"]["dataset"]) == 64
    assert env["layout"]["attention"] == "sdpa"  # model.attention = auto, resolved for the CPU
    reloaded = load_config(str(folder / "config.toml"), [])
    assert reloaded.debug.seed == config.debug.seed  # ...and written, so config.toml reproduces the run
    assert reloaded == config
    assert any((folder / "tb").iterdir())
    # A second run in the same folder keeps the first run's metrics under a numbered name.
    Trainer(tiny_config(tmp_path, "--training.steps", "1"), show_progress=False).train()
    assert len(read_metrics(folder)) == 1 and (folder / "metrics.1.jsonl").exists()


@pytest.mark.parametrize("mode, option", [("full", "op"), ("selective", "op"), ("selective", "2")])
def test_activation_checkpointing_keeps_the_numbers(tmp_path, mode, option):
    reference, _ = _run(tiny_config(tmp_path / "ref", "--training.steps", "2"))
    checkpointed, _ = _run(
        tiny_config(
            tmp_path / "ac", "--training.steps", "2", "--activation_checkpoint.mode", mode,
            "--activation_checkpoint.selective_ac_option", option, "--activation_checkpoint.preserve_rng_state",
        )
    )  # fmt: skip
    for a, b in zip(reference, checkpointed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_bf16_trains_in_one_process(tmp_path):
    metrics, _ = _run(tiny_config(tmp_path, "--training.mixed_precision", "bf16", "--training.steps", "2"))
    assert all(math.isfinite(m["loss"]) for m in metrics)


def test_lr_schedule_warmup_stable_decay():
    schedule = LRSchedulerConfig(warmup_steps=2, decay_ratio=0.5, decay_type="linear", min_lr_factor=0.1)
    factors = [lr_factor(s, 10, schedule) for s in range(10)]
    assert factors[:2] == [1 / 3, 2 / 3]
    assert factors[2:5] == [1.0, 1.0, 1.0]
    assert factors[5] > factors[6] > factors[8] and factors[9] == pytest.approx(0.1)
    for kind in ("cosine", "sqrt"):
        schedule = LRSchedulerConfig(warmup_steps=0, decay_type=kind)
        assert lr_factor(0, 4, schedule) < 1.0 and lr_factor(3, 4, schedule) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "signum, checkpointing, code",
    [(signal.SIGTERM, [], 76), (signal.SIGHUP, ["--checkpoint.enable", "--checkpoint.interval", "100000"], 75)],
    ids=["sigterm-nothing-saved", "sighup-saved"],
)
def test_a_signal_stops_cleanly_after_flushing_metrics_and_says_whether_it_saved(tmp_path, signum, checkpointing, code):
    """SIGTERM and SIGHUP stop after the current step; exit 75 ("saved: rerun to resume") only when the
    stop checkpoint was written, else 76 with a line saying nothing was saved."""
    folder = tmp_path / "run"
    command = [
        sys.executable, "-m", "lockstep.train", "--config", "llama3_debug", "--model.flavor", "tiny",
        "--training.steps", "100000", "--training.seq_len", "32", "--training.local_batch_size", "2",
        "--metrics.log_freq", "1000", "--job.dump_folder", str(folder), "--training.device", "cpu", *checkpointing,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (folder / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and not (folder / "metrics.jsonl").read_text():
        time.sleep(0.2)  # step 1 is always logged
    process.send_signal(signum)
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == code, output
    stopped_at = int(re.search(r"stopped by signal after step (\d+)", output).group(1))
    assert read_metrics(folder)[-1]["step"] == stopped_at  # the step it stopped at was flushed too
    saved = folder / "checkpoint" / f"step-{stopped_at:08d}"
    assert saved.is_dir() == (code == 75)
    assert ("nothing was saved" in output) == (code == 76)


def test_compiled_blocks_and_loss_match_eager(tmp_path):
    eager, _ = _run(tiny_config(tmp_path / "eager", "--training.steps", "2"))
    compiled, _ = _run(tiny_config(tmp_path / "compiled", "--training.steps", "2", "--compile.enable"))
    for a, b in zip(eager, compiled, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_plain_reductions_agree_to_rounding(tmp_path):
    """The usual .grad accumulation and clip_grad_norm_ give the same run up to summation order."""
    args = ("--training.global_batch_size", "8", "--training.steps", "3")
    canonical, _ = _run(tiny_config(tmp_path / "canonical", *args))
    plain, _ = _run(tiny_config(tmp_path / "plain", *args, "--debug.no-layout-invariant-reductions"))
    for a, b in zip(canonical, plain, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_one_host_read_per_step(tmp_path):
    """Loss, grad norm, the non-finite check and the stop flag are read from the device together,
    once per step (the loader's int() calls read CPU tensors of sample indices, not the device)."""
    with Trainer(tiny_config(tmp_path, "--training.global_batch_size", "4"), show_progress=False) as trainer:
        trainer.train_step()  # first step: lazy set-up (optimizer state, caches) is not the steady state
        with host_reads() as reads:
            for _ in range(3):
                trainer.train_step()
    reads.pop("loader.py", None)
    reads.pop("outside lockstep", None)  # torch's own (AdamW's CPU step counters)
    assert reads == {"state.py": 3}  # StepResult.read
