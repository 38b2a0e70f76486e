"""Compare runs step by step: loss, grad norm, fingerprints; name the first step that differs.

A run is a run folder (its metrics.jsonl) or a reference loss file (JSON Lines, or a JSON list, of
records with at least "step" and "loss"). Non-finite numbers may be bare JSON tokens (NaN, Infinity,
-Infinity, which Python's json reads) or strings ("NaN", "Infinity", "-Infinity"), as strict JSON
writers give them. "Equal" means the same bits of the float, so identical NaNs are equal.

Records with ``val_loss`` (the in-loop validation's held-out loss) are compared too, at the evaluation
steps every run has one: a second table, and the same gates. Where only some runs evaluated at a step
it is noted, not gated (the validation settings are in the config differences printed above).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockstep.errors import InputError
from lockstep.tools.torchtitan_runs import event_files, is_torchtitan_log, log_series, tensorboard_series
from lockstep.untrusted import load_toml, parse_json

FINGERPRINTS = ("grad_fingerprint", "param_fingerprint")
NUMBERS = ("loss", "grad_norm", "val_loss")
"""Read as floats; a record without grad_norm or val_loss holds None for it."""
ENVIRONMENT_FACTS = ("versions.torch", "threads", "world_size", "git.revision", "git.dirty", "layout")
"""env.json entries whose differences can explain differing numbers (layout is flattened)."""
IGNORED_CONFIG_KEYS = ("job.dump_folder",)
"""Config keys that differ between any two runs and say nothing about their numbers."""


def _number(value: Any, file: Path, where: str, key: str) -> float | None:
    if value is None and key != "loss":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InputError(file, f'"{key}" is {value!r}, not a number', where=where)
    try:
        return float(value)  # a string: "NaN", "Infinity", "-Infinity" (also "nan", "inf")
    except ValueError:
        raise InputError(file, f'"{key}" is {value!r}, not a number', where=where) from None


def load_series(path: Path) -> dict[int, dict]:
    """step -> record (loss and grad norm as floats). For a resumed run the last record of a step wins.
    An unreadable, malformed or empty file raises InputError (exit 2): a gate must not pass on it."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    fix = "give a run folder with metrics.jsonl, a loss file (JSON Lines of {step, loss}), or a torchtitan log or tb folder"
    if path.is_dir() and not file.is_file() and event_files(path):
        return tensorboard_series(path)  # a torchtitan run's TensorBoard folder
    if not file.is_file():
        raise InputError(path, "neither a run folder with metrics.jsonl nor a loss file", fix)
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(file, f"unreadable ({error})") from None
    if not text.lstrip().startswith(("[", "{")) and is_torchtitan_log(text):
        return log_series(file, text)
    try:
        if text.lstrip().startswith("["):
            records = [(f"record {i + 1}", r) for i, r in enumerate(parse_json(text, allow_nan=True))]
        else:
            lines = enumerate(text.splitlines(), 1)
            records = [(f"line {n}", parse_json(x, allow_nan=True)) for n, x in lines if x.strip()]
    except ValueError as error:
        raise InputError(file, f"not JSON: {error}", fix) from None
    if not records:
        raise InputError(file, "has no records (empty: did the run log any step?)", fix)
    series = {}
    for where, record in records:
        if not isinstance(record, dict) or "step" not in record or "loss" not in record:
            raise InputError(file, 'a record without "step" and "loss"', fix, where=where)
        if isinstance(record["step"], bool) or not isinstance(record["step"], int):
            raise InputError(file, f'"step" is {record["step"]!r}, not an integer', where=where)
        numbers = {key: _number(record.get(key), file, where, key) for key in NUMBERS}
        series[record["step"]] = record | numbers
    return series


def bits(x: float | None) -> bytes | None:
    """The float's IEEE 754 bits: equal bits are the same number, NaN included (NaN != NaN)."""
    return None if x is None else struct.pack("<d", x)


def steps_missing(series: list[dict[int, dict]]) -> list[list[int]]:
    """Per run, the steps that some other run logged and it did not (all empty: same step sets)."""
    every = set().union(*(set(s) for s in series))
    return [sorted(every - set(s)) for s in series]


def describe_steps(steps: list[int]) -> str:
    """Steps as ranges: 1-4, 7, 9-10."""
    ranges: list[list[int]] = []
    for step in steps:
        if ranges and step == ranges[-1][1] + 1:
            ranges[-1][1] = step
        else:
            ranges.append([step, step])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _run_facts(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(flattened config.toml, chosen env.json facts) of a run folder; empty for a loss file or
    where the files are missing or unreadable (a diff is context, not a gate)."""
    config: dict[str, Any] = {}
    env: dict[str, Any] = {}
    if not Path(path).is_dir():
        return config, env
    try:
        config = _flatten(load_toml((path / "config.toml").read_bytes()))
    except (OSError, ValueError):
        pass
    try:
        flat_env = _flatten(parse_json((path / "env.json").read_bytes(), allow_nan=True))
        env = {k: v for k, v in flat_env.items() if any(k == f or k.startswith(f + ".") for f in ENVIRONMENT_FACTS)}
    except (OSError, ValueError, AttributeError):
        pass
    return config, env


def _differences(dicts: list[dict[str, Any]], ignored: tuple[str, ...] = ()) -> list[str]:
    keys = sorted(set().union(*dicts) - set(ignored))
    lines = []
    for key in keys:
        values = [d.get(key, "(unset)") for d in dicts]
        if any(v != values[0] for v in values):
            lines.append(f"  {key}: " + " vs ".join(map(str, values)))
    return lines


def describe_run_differences(paths: list[Path]) -> list[str]:
    """Config keys (``section.key: a vs b``) and environment facts (torch version, threads, world
    size, git revision, layout) that differ between the runs: what may explain a difference."""
    facts = [_run_facts(Path(p)) for p in paths]
    lines = []
    config = _differences([c for c, _ in facts], IGNORED_CONFIG_KEYS)
    if config:
        lines += ["config differs:", *config]
    env = _differences([e for _, e in facts])
    if env:
        lines += ["environment differs:", *env]
    return lines


def _max_abs_diff(values: list[float]) -> float:
    """The largest |value - first value|; 0 where the bits are equal (NaN - NaN), NaN if any is NaN."""
    diffs = [0.0 if bits(x) == bits(values[0]) else abs(x - values[0]) for x in values]
    return math.nan if any(map(math.isnan, diffs)) else max(diffs)  # max() drops a NaN after a number


def _same_bits(values: list[float | None]) -> bool:
    return all(bits(x) == bits(values[0]) for x in values)


def _within(values: list[float], rtol: float, atol: float) -> bool:
    """Every value within atol + rtol * |first value|; equal bits (NaN, inf) always are."""
    first = values[0]
    return all(bits(x) == bits(first) or abs(x - first) <= atol + rtol * abs(first) for x in values)


@dataclass
class StepComparison:
    step: int
    losses: list[float]
    grad_norms: list[float | None]
    fingerprints_match: bool | None
    """None when not every run recorded fingerprints at this step."""

    def max_abs_diff(self) -> float:
        return _max_abs_diff(self.losses)

    def max_rel_diff(self) -> float:
        return self.max_abs_diff() / max(abs(self.losses[0]), 1e-30)

    def grad_norms_equal(self) -> bool:
        return _same_bits(self.grad_norms)

    def bitwise_equal(self) -> bool:
        return _same_bits(self.losses) and self.grad_norms_equal() and self.fingerprints_match is not False

    def within(self, rtol: float, atol: float) -> bool:
        """Every loss within atol + rtol * |first run's loss|; equal bits (NaN, inf) always are."""
        return _within(self.losses, rtol, atol)


@dataclass
class EvaluationComparison:
    """val_loss of every run at one evaluation step."""

    step: int
    val_losses: list[float]

    def max_abs_diff(self) -> float:
        return _max_abs_diff(self.val_losses)

    def max_rel_diff(self) -> float:
        return self.max_abs_diff() / max(abs(self.val_losses[0]), 1e-30)

    def bitwise_equal(self) -> bool:
        return _same_bits(self.val_losses)

    def within(self, rtol: float, atol: float) -> bool:
        return _within(self.val_losses, rtol, atol)


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


def compare_validation(series: list[dict[int, dict]]) -> list[EvaluationComparison]:
    """Per step (in order) at which every run logged a val_loss; empty when some run never evaluated."""
    steps = set.intersection(*({step for step, r in s.items() if r.get("val_loss") is not None} for s in series))
    return [EvaluationComparison(step, [s[step]["val_loss"] for s in series]) for step in sorted(steps)]


def evaluations_missing(series: list[dict[int, dict]]) -> list[list[int]]:
    """Per run, the steps at which some other run logged a val_loss and it did not."""
    return steps_missing([{step: r for step, r in s.items() if r.get("val_loss") is not None} for s in series])


def first_difference(
    rows: list[StepComparison] | list[EvaluationComparison], rtol: float | None = None, atol: float | None = None
) -> int | None:
    """The first step that differs: bitwise (loss, grad norm, fingerprints; or val_loss), or beyond the
    tolerance."""
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
        norms_equal = "yes" if row.grad_norms_equal() else "no"
        cells = [str(row.step), *(f"{x:.9g}" for x in row.losses)]
        cells += [f"{row.max_abs_diff():.3e}", f"{row.max_rel_diff():.3e}", norms_equal, fingerprints]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def format_validation_table(rows: list[EvaluationComparison], names: list[str]) -> str:
    header = ["eval step", *(f"val_loss {n}" for n in names), "max abs diff", "max rel diff", "bitwise equal"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        cells = [str(row.step), *(f"{x:.9g}" for x in row.val_losses)]
        cells += [f"{row.max_abs_diff():.3e}", f"{row.max_rel_diff():.3e}", "yes" if row.bitwise_equal() else "no"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def plot(
    rows: list[StepComparison], names: list[str], out: Path, evaluations: list[EvaluationComparison] | None = None
) -> None:
    """Loss curves (top) and |loss - loss of the first run| (bottom, log scale) as a PNG. val_loss, where
    compared, is drawn on the same axes as dashed lines with circles (the run's colour), and its
    difference as circles below: held-out and training loss read on one scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluations = evaluations or []
    steps = [r.step for r in rows]
    eval_steps = [e.step for e in evaluations]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    colors = [f"C{i}" for i in range(len(names))]
    for i, name in enumerate(names):
        top.plot(steps, [r.losses[i] for r in rows], color=colors[i], label=name)
        if evaluations:
            val = [e.val_losses[i] for e in evaluations]
            top.plot(eval_steps, val, color=colors[i], linestyle="--", marker="o", label=f"val_loss {name}")
    top.set_ylabel("loss")
    top.legend()
    for i, name in enumerate(names[1:], start=1):
        diffs = [abs(r.losses[i] - r.losses[0]) for r in rows]
        label = f"|{name} - {names[0]}|"
        bottom.plot(steps, [d if d > 0 else math.nan for d in diffs], color=colors[i], marker=".", label=label)
        if evaluations:
            val_diffs = [abs(e.val_losses[i] - e.val_losses[0]) for e in evaluations]
            shown = [d if d > 0 else math.nan for d in val_diffs]
            bottom.plot(eval_steps, shown, color=colors[i], linestyle="none", marker="o", label=f"val_loss {label}")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.set_ylabel("abs loss difference")
    bottom.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
