"""Compare runs step by step: loss, grad norm, fingerprints; name the first step that differs.

A run is a run folder (its metrics.jsonl) or a reference loss file (JSON Lines, or a JSON list, of
records with at least "step" and "loss").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

FINGERPRINTS = ("grad_fingerprint", "param_fingerprint")


def load_series(path: Path) -> dict[int, dict]:
    """step -> record. For a resumed run the last record of a step wins."""
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{path} is neither a run folder with metrics.jsonl nor a loss file")
    text = file.read_text()
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    return {int(r["step"]): r for r in records}


@dataclass
class StepComparison:
    step: int
    losses: list[float]
    grad_norms: list[float | None]
    fingerprints_match: bool | None
    """None when not every run recorded fingerprints at this step."""

    def max_abs_diff(self) -> float:
        return max(abs(x - self.losses[0]) for x in self.losses)

    def max_rel_diff(self) -> float:
        return max(abs(x - self.losses[0]) / max(abs(self.losses[0]), 1e-30) for x in self.losses)

    def bitwise_equal(self) -> bool:
        same = all(x == self.losses[0] for x in self.losses) and all(g == self.grad_norms[0] for g in self.grad_norms)
        return same and self.fingerprints_match is not False

    def within(self, rtol: float, atol: float) -> bool:
        return all(
            abs(x - self.losses[0]) <= atol + rtol * abs(self.losses[0])
            or (math.isnan(x) and math.isnan(self.losses[0]))
            for x in self.losses
        )


def compare_series(series: list[dict[int, dict]]) -> list[StepComparison]:
    """Per common step (in order) of all runs."""
    steps = sorted(set.intersection(*(set(s) for s in series)))
    rows = []
    for step in steps:
        records = [s[step] for s in series]
        fingerprints = None
        for key in FINGERPRINTS:
            if all(key in r for r in records):
                same = all(r[key] == records[0][key] for r in records)
                fingerprints = same if fingerprints is None else fingerprints and same
        rows.append(
            StepComparison(step, [r["loss"] for r in records], [r.get("grad_norm") for r in records], fingerprints)
        )
    return rows


def first_difference(rows: list[StepComparison], rtol: float | None = None, atol: float | None = None) -> int | None:
    """The first step that differs: bitwise (loss, grad norm, fingerprints), or beyond the tolerance."""
    for row in rows:
        differs = not row.within(rtol or 0.0, atol or 0.0) if (rtol or atol) else not row.bitwise_equal()
        if differs:
            return row.step
    return None


def format_table(rows: list[StepComparison], names: list[str]) -> str:
    header = ["step", *(f"loss {n}" for n in names), "max abs diff", "max rel diff", "grad norms equal", "fingerprints"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        fingerprints = {None: "-", True: "match", False: "DIFFER"}[row.fingerprints_match]
        norms_equal = "yes" if all(g == row.grad_norms[0] for g in row.grad_norms) else "no"
        cells = [str(row.step), *(f"{x:.9g}" for x in row.losses)]
        cells += [f"{row.max_abs_diff():.3e}", f"{row.max_rel_diff():.3e}", norms_equal, fingerprints]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def plot(rows: list[StepComparison], names: list[str], out: Path) -> None:
    """Loss curves (top) and |loss - loss of the first run| (bottom, log scale) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in rows]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for i, name in enumerate(names):
        top.plot(steps, [r.losses[i] for r in rows], label=name)
    top.set_ylabel("loss")
    top.legend()
    for i, name in enumerate(names[1:], start=1):
        diffs = [abs(r.losses[i] - r.losses[0]) for r in rows]
        bottom.plot(steps, [d if d > 0 else float("nan") for d in diffs], marker=".", label=f"|{name} - {names[0]}|")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.set_ylabel("abs loss difference")
    bottom.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
