"""benchmarks/step_overhead.py still drives the real Trainer (its dry path: 3 paired steps, no timings
asserted, nothing written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_overhead.py"


def test_help_names_the_shapes():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "nanogpt" in out and "llama3_debug" in out


def test_dry_run_pairs_lockstep_and_plain_steps_on_the_same_batches():
    command = [sys.executable, str(SCRIPT), "--dry", "--shapes", "nanogpt", "--threads", "1"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ.copy()).stdout
    line = next(line for line in out.splitlines() if line.startswith("nanogpt"))
    assert "lockstep" in line and "plain" in line and "ratio" in line
    assert "loss gap 0.0e+00" in line  # same weights, batches and loss: the first steps agree bitwise
