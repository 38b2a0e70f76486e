"""lockstep.tools.estimate.report.render: the text shows every memory term that some stage holds (by its
name, per stage) and leaves out those no stage holds, the traffic totals of the rank that sends most
between nodes, the verdict with its biggest term, and one line per advised layout. Expected text is
derived from the Estimate rendered (a real one, traced on CPU, with advice entries set here)."""

from __future__ import annotations

from lockstep.config import load_config
from lockstep.tools.estimate import Topology, device_spec, estimate
from lockstep.tools.estimate.report import MEMORY_NAMES, render

VOCAB = 2048  # the built-in tokenizer's


def test_the_report_shows_what_the_estimate_holds():
    result = estimate(load_config("llama3_debug", []), Topology(1, 2), device_spec("cpu", memory_gib=0.25),
                      vocab_size=VOCAB)  # fmt: skip
    result.advice = [
        {"change": "--a.b 1", "peak_gib": 0.2, "fits": True, "step_s": 0.5, "mfu_ceiling_percent": 12.5},
        {"change": "--c.d 2", "peak_gib": 0.5, "fits": False, "step_s": 0.25, "mfu_ceiling_percent": 25.0},
    ]
    lines = render(result).splitlines()
    for term, name in MEMORY_NAMES.items():
        held = [s.memory[term] for s in result.stages]
        shown = [line for line in lines if line.startswith(name + " ")]
        if any(v > 0.005 for v in held):
            assert len(shown) == 1 and shown[0].split()[-len(held) :] == [f"{v:.2f}" for v in held], term
        else:
            assert not shown, term
    worst = max(result.stages, key=lambda s: sum(v["inter_gb"] for v in s.traffic.values()))
    totals = [line.split() for line in lines if line.startswith("total ") and "(" not in line]
    assert totals == [["total", f"{sum(v['intra_gb'] for v in worst.traffic.values()):.3f}",
                       f"{sum(v['inter_gb'] for v in worst.traffic.values()):.3f}",
                       f"{sum(v['inter_gb'] for v in worst.ring_traffic.values()):.3f}"]]  # fmt: skip
    verdict = [line for line in lines if line.startswith("verdict: ")]
    fit = "fits" if result.verdict["fits"] else "does NOT fit"
    assert len(verdict) == 1 and verdict[0].startswith(f"verdict: {fit}: ")
    assert f"the biggest term is {MEMORY_NAMES[result.verdict['biggest_term']]} " in verdict[0]
    advised = [line for line in lines if line.startswith("  --")]
    assert advised == [
        "  --a.b 1: 0.2 GiB, fits; step >= 0.500 s, MFU ceiling 12.5%",
        "  --c.d 2: 0.5 GiB, still does not fit; step >= 0.250 s, MFU ceiling 25.0%",
    ]
