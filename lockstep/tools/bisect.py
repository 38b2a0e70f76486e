"""Locate where two runs part: the first step whose numbers differ, then, by replaying that step in
both settings with hooks, the first module whose output or gradient differs, or else the gradient
reduction or the optimizer update."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lockstep.tools.compare import compare_series, first_difference, load_series
from lockstep.tools.replay import launch_replay
from lockstep.untrusted import parse_json


@dataclass
class Finding:
    step: int | None
    phase: str = ""
    """forward, backward, gradients (after the cross-rank reduction), parameters (the update), or ""."""
    name: str = ""
    module_type: str = ""
    detail: str = ""

    def describe(self) -> str:
        if self.step is None:
            return "the runs agree at every common step"
        if not self.phase:
            return f"step {self.step} differs, but replaying it gave identical tensors ({self.detail})"
        where = {
            "forward": f"the forward output of {self.name} ({self.module_type})",
            "backward": f"the output gradient of {self.name} ({self.module_type})",
            "gradients": f"the reduced gradient of {self.name}: forward and backward agree, the reduction differs",
            "parameters": f"the updated value of {self.name}: forward and backward agree, the optimizer update differs",
        }[self.phase]
        return f"first difference at step {self.step}: {where}; {self.detail}"


def replay(run: Path, step: int, out: Path) -> dict:
    """Replay `run`'s step with hooks on every module (lockstep.tools.replay); the ranks' merged capture."""
    launch_replay(run, step, out)
    parts = sorted(
        (torch.load(f, weights_only=True) for f in out.parent.glob(f"{out.name}.rank*.pt")), key=lambda c: c["stage"]
    )
    merged: dict = {"forward": {}, "backward": {}, "gradients": {}, "parameters": {}}
    for part in parts:  # forward in stage order; backward runs from the last stage back
        merged["forward"] |= part["forward"]
        merged["gradients"] |= part["gradients"]
        merged["parameters"] |= part["parameters"]
    for part in reversed(parts):
        merged["backward"] |= part["backward"]
    return merged


def _difference(a: torch.Tensor, b: torch.Tensor) -> str | None:
    if a.shape != b.shape:
        return f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    if torch.equal(a, b):
        return None
    diff = (a - b).abs()
    rel = diff / b.abs().clamp_min(1e-30)
    return f"max abs diff {diff.max().item():.3e}, max rel diff {rel.max().item():.3e}, shape {tuple(a.shape)}"


def locate(capture_a: dict, capture_b: dict, step: int) -> Finding:
    for phase in ("forward", "backward"):
        for name, (module_type, value) in capture_a[phase].items():
            if name not in capture_b[phase]:
                continue
            if detail := _difference(value, capture_b[phase][name][1]):
                return Finding(step, phase, name, module_type, detail)
    for phase in ("gradients", "parameters"):
        for name, value in capture_a[phase].items():
            if name in capture_b[phase] and (detail := _difference(value, capture_b[phase][name])):
                return Finding(step, phase, name, "", detail)
    return Finding(step, detail="nondeterminism, or a difference outside the captured tensors")


def bisect(run_a: Path, run_b: Path, work: Path) -> Finding:
    rows = compare_series([load_series(run_a), load_series(run_b)])
    step = first_difference(rows)
    if step is None:
        return Finding(None)
    work.mkdir(parents=True, exist_ok=True)
    captures = [replay(run, step, work / f"capture-{i}") for i, run in enumerate((run_a, run_b))]
    finding = locate(*captures, step)
    threads = [_recorded_threads(run) for run in (run_a, run_b)]
    if not finding.phase and threads[0] != threads[1]:
        finding.detail += f"; the runs used {threads[0]} and {threads[1]} CPU threads, which changes kernel sums"
    return finding


def _recorded_threads(run: Path) -> object:
    """The CPU threads a run recorded in env.json, or None where it is missing or unreadable."""
    try:
        record = parse_json((run / "env.json").read_bytes())
    except (OSError, ValueError):
        return None
    return record.get("threads") if isinstance(record, dict) else None
