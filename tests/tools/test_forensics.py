"""Which data, which module, which machine: spike detection, lockstep inspect and lockstep replay.

One run trains the tiny Llama on a corpus of simple sentences that holds one pathological document
(random CJK characters, bytes the model never learns to expect). Every step that trains on a window of
it must be recorded as a spike, and inspecting the spike must name that document."""

import json
import os
import random
import subprocess
import sys

import pytest

from lockstep.config import load_config
from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.helpers import run_cli

PATHOLOGICAL = 60
"""The document number (line) of the random characters in the corpus file."""
WINDOW = 8
STEPS = 30
LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")


def _write_corpus(path) -> None:
    rng = random.Random(0)
    nouns = "cat dog bird fish horse cow king queen ship house tree river".split()
    verbs = "sees likes finds chases follows keeps builds paints".split()
    adjectives = "red big small old new quiet fast slow".split()
    documents = [
        " ".join(
            f"the {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}."
            for _ in range(rng.randint(3, 6))
        )
        for _ in range(120)
    ]
    documents.insert(PATHOLOGICAL, "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(200)))
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))


def _train(folder, corpus, *overrides: str) -> list[dict]:
    config = load_config("llama3_debug", [
        "--job.dump_folder", str(folder), "--model.flavor", "tiny", "--model.tokenizer", "bytes",
        "--training.dataset", "json", "--training.dataset_path", str(corpus), "--training.steps", str(STEPS),
        "--training.local_batch_size", "2", "--training.seq_len", "32", "--training.device", "cpu",
        "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
        "--debug.seed", "7", "--debug.fingerprint", "--checkpoint.enable", "--checkpoint.interval", "10",
        *overrides,
    ])  # fmt: skip
    with Trainer(config, show_progress=False) as trainer:
        trainer.train()
    return read_metrics(folder)


@pytest.fixture(scope="module")
def spiky(tmp_path_factory):
    """(run folder, corpus, metrics) of the run with spike detection (log)."""
    root = tmp_path_factory.mktemp("spiky")
    _write_corpus(root / "corpus.jsonl")
    metrics = _train(root / "run", root / "corpus.jsonl", "--debug.spike_window", str(WINDOW))
    return root / "run", root / "corpus.jsonl", metrics


def _spikes(run) -> list[dict]:
    return [json.loads(line) for line in (run / "spikes.jsonl").read_text().splitlines()]


def test_a_pathological_document_is_detected_and_inspected(spiky, capfd):
    from lockstep.tools.inspect_step import step_samples

    run, corpus, _ = spiky
    pathological = {
        step
        for step in range(WINDOW + 1, STEPS + 1)
        if any(s.document == PATHOLOGICAL for s in step_samples(run, step).sources)
    }
    spikes = _spikes(run)
    assert pathological and {s["step"] for s in spikes} == pathological
    for spike in spikes:
        sources = step_samples(run, spike["step"]).sources
        assert spike["samples"] == [s.sample for s in sources]
        worst = max(range(len(sources)), key=lambda i: spike["sample_losses"][i])
        assert sources[worst].document == PATHOLOGICAL and sources[worst].file == str(corpus.resolve())
        assert spike["z_score"] > 5 and spike["action"] == "log"
    # The replayed per-sample losses are the ones the spike recorded, and the step loss the trained one.
    step = spikes[0]["step"]
    code, out, _ = run_cli(["inspect", str(run), "--step", str(step), "--losses", "--json"], capfd)
    shown = json.loads(out)
    assert code == 0 and shown["loss_matches"] is True
    assert shown["sample_losses"] == spikes[0]["sample_losses"]
    assert shown["replayed_loss"] == spikes[0]["loss"]
    assert {s["document"] for s in shown["sources"]} >= {PATHOLOGICAL}
    code, out, _ = run_cli(["replay", str(run), "--step", str(step)], capfd)
    assert code == 0 and f"step {step} reproduces here" in out
    code, _, err = run_cli(["replay", str(run), "--step", "99"], capfd)
    assert code == 2 and "step 99 was not logged" in err


def test_inspect_names_the_windows_the_loader_serves(spiky, capfd):
    from lockstep.data.loader import DataLoader, build_token_windows
    from lockstep.data.tokenizer import build_tokenizer

    run, _, _ = spiky
    config = load_config(str(run / "config.toml"), [])
    tokenizer = build_tokenizer(config.model, config.data)
    seed = json.loads((run / "env.json").read_text())["seeds"]["data"]
    loader = DataLoader(
        build_token_windows(config.training, config.data, tokenizer), seed=seed, global_batch=2, local_batch=1
    )
    step = 17
    code, out, _ = run_cli(["inspect", str(run), "--step", str(step), "--json", "--preview-tokens", "12"], capfd)
    shown = json.loads(out)["sources"]
    assert code == 0 and [s["sample"] for s in shown] == [32, 33]
    for j, source in enumerate(shown):
        assert source["window"] == loader.order.window_of(32 + j)
        served = loader.global_microbatch(32, j).inputs[0, :12].tolist()
        assert source["preview"] == tokenizer.decode(served)


def test_detection_and_profiling_change_no_bit_and_skip_drops_the_update(spiky, tmp_path):
    run, corpus, with_detection = spiky
    profiled = [
        "--profiling.enable_profiling", "--profiling.profile_freq", "10", "--profiling.profiler_warmup", "1",
        "--profiling.enable_memory_snapshot",  # on CPU: a per-step peak-RSS timeline
    ]  # fmt: skip
    plain = _train(tmp_path / "plain", corpus, *profiled)
    keys = ("loss", "grad_norm", "grad_fingerprint", "param_fingerprint")
    assert [[r[k] for k in keys] for r in plain] == [[r[k] for k in keys] for r in with_detection]
    for step in (10, 20, 30):  # a Chrome trace per traced step, with the step's span
        trace = json.loads(
            (tmp_path / "plain" / "profile_traces" / f"iteration_{step}" / "rank0_trace.json").read_text()
        )
        names = {event.get("name") for event in trace["traceEvents"]}
        assert f"lockstep_step {step}" in names and f"lockstep_step {step - 1}" not in names
    assert not (tmp_path / "plain" / "spikes.jsonl").exists()
    timeline = (tmp_path / "plain" / "memory_snapshot" / "rank0_rss.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in timeline] == list(range(1, STEPS + 1))
    assert all(0.05 < json.loads(line)["peak_rss_gib"] < 64 for line in timeline)

    first = _spikes(run)[0]["step"]
    skipped = _train(tmp_path / "skip", corpus, "--debug.spike_window", str(WINDOW), "--debug.spike_action", "skip")
    by_step = {r["step"]: r for r in skipped}
    assert by_step[first]["param_fingerprint"] == by_step[first - 1]["param_fingerprint"]  # no update
    assert by_step[first - 1]["param_fingerprint"] == with_detection[first - 2]["param_fingerprint"]
    assert _spikes(tmp_path / "skip")[0]["action"] == "skip"


def test_replay_reproduces_a_step_or_names_the_faulty_rank_and_module(tmp_path, monkeypatch):
    """Rank 1 of 2 computes a slightly wrong feed-forward at step 4 (a simulated silent hardware fault,
    tests/assets/faulty_rank.py, switched on by the environment of the run only). Replaying step 4 on
    this "healthy machine" names rank 1 and the first module whose output changed."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, *sys.path]))
    command = [
        LOCKSTEP, "train", "--nproc", "2", "--config", "llama3_debug", "--job.dump_folder", str(tmp_path / "run"),
        "--model.flavor", "tiny", "--training.steps", "4", "--training.local_batch_size", "2",
        "--training.seq_len", "32", "--training.device", "cpu", "--metrics.log_freq", "2", "--debug.seed", "7",
        "--debug.fingerprint", "--checkpoint.enable", "--checkpoint.interval", "2",
        "--job.custom_config_module", "tests.assets.faulty_rank",
    ]  # fmt: skip
    environment = os.environ | {"OMP_NUM_THREADS": "1", "LOCKSTEP_TEST_FAULT": "1:4"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = read_metrics(tmp_path / "run")[-1]  # the step metrics pool both ranks
    assert last["max_rank_step_time_s"] >= last["min_rank_step_time_s"] > 0 and last["slowest_rank"] in (0, 1)
    assert last["memory/peak_gib_max"] >= last["memory/peak_gib_min"] > 0

    untrusted = subprocess.run(
        [LOCKSTEP, "replay", str(tmp_path / "run"), "--step", "4"], capture_output=True, text=True, timeout=300
    )
    assert untrusted.returncode == 2 and "never imports code by itself" in untrusted.stderr, untrusted.stderr[-3000:]
    monkeypatch.setenv("LOCKSTEP_CONFIG_MODULES", "tests.assets.faulty_rank")  # the user vouches for it
    faulty = subprocess.run(
        [LOCKSTEP, "replay", str(tmp_path / "run"), "--step", "4"], capture_output=True, text=True, timeout=300
    )
    assert faulty.returncode == 1, faulty.stderr[-3000:]
    assert "first difference: rank 1, the forward output of layers.0.feed_forward" in faulty.stdout
    assert "only rank(s) 1 of 2 computed another forward" in faulty.stdout
