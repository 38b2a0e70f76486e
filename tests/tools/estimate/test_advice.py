"""lockstep.tools.estimate.advice: for a layout that does not fit, lockstep estimate names the nearest
layouts that do."""

from __future__ import annotations

from tests.helpers import run_cli


def test_a_layout_that_does_not_fit_names_its_biggest_term_and_layouts_that_fit(capfd):
    code, out, err = run_cli(
        ["estimate", "--config", "llama3_debug", "--nproc", "2", "--device", "cpu", "--device-memory", "0.25"], capfd
    )
    assert code == 1, err
    assert "does NOT fit" in out and "the biggest term is" in out
    fixes = [
        line
        for line in out.splitlines()
        if line.startswith("  --") and line.rstrip().endswith("%") and ", fits;" in line
    ]
    assert fixes, out
