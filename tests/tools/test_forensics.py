"""Which data, which module, which machine: spike detection, lockstep inspect and lockstep replay.

One run trains the tiny Llama on a corpus of simple sentences that holds one pathological document
(random CJK characters, bytes the model never learns to expect). Every step that trains on a window of
it must be recorded as a spike, and inspecting the spike must name that document (the run:
tests/tools/spiky.py). lockstep inspect alone: test_inspect_step.py; lockstep replay alone: test_reproduce.py."""

import json

from tests.helpers import run_cli
from tests.tools.spiky import PATHOLOGICAL, STEPS, WINDOW, _spikes, _train


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
