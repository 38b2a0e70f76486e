"""Does step N of a run reproduce on this machine? ``lockstep replay RUN --step N``.

The step is recomputed from the newest checkpoint before it, in the run's own layout and thread count,
by bisect's replay (lockstep.tools.replay, verify mode), and compared with what the run recorded at
that step: loss, grad norm, and the gradient and parameter fingerprints (metrics.jsonl, written when
the run had ``debug.fingerprint``).

When they match, the step is reproducible here. When they differ, the per-rank records of the step
(``fingerprints/rank<R>.jsonl``: each module's first output on the rank's first microbatch, and the
rank's part of every gradient and parameter) locate it. A rank whose own forward computed other
numbers from the same weights and data is named with its first module in execution order. If only
some ranks' forwards differ, the suspect is those ranks' hardware (silent data corruption) or their
environment; if every rank's does, the software, settings or data changed (env.json's versions and
git revision are compared too). If no forward differs, the first gradient (backward or reduction) or
updated parameter (optimizer) that does is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lockstep.errors import InputError
from lockstep.run.folder import environment_differences
from lockstep.run.jsonl import json_floats
from lockstep.run.launches import env_for_step
from lockstep.tools.compare import load_series
from lockstep.tools.inspect_step import step_samples
from lockstep.tools.replay import launch_replay, read_replay
from lockstep.train.observe.fingerprint import RankFingerprints

CHECKED = ("loss", "grad_norm", "grad_fingerprint", "param_fingerprint")


@dataclass
class Verdict:
    step: int
    mismatches: dict[str, tuple] = field(default_factory=dict)
    """Recorded value, replayed value, for each of CHECKED that differs."""
    ranks: list[int] = field(default_factory=list)
    """Ranks whose own forward computed other numbers, in rank order (or, when no forward differs, the
    ranks whose gradients or parameters do)."""
    first: str = ""
    """The first difference of the first such rank, e.g. "forward output of layers.1.feed_forward"."""
    in_forward: bool = False
    unrecorded: list[int] = field(default_factory=list)
    """Ranks without a readable per-rank record of the step (a run from before they were written, or a
    torn line): they cannot be located."""
    environment: list[str] = field(default_factory=list)
    """How this machine's versions differ from the run's (env.json)."""
    world_size: int = 1

    @property
    def reproduced(self) -> bool:
        return not self.mismatches

    def describe(self) -> str:
        if self.reproduced:
            return f"step {self.step} reproduces here: loss, grad norm and both fingerprints are bitwise equal"
        differing = ", ".join(f"{k} {a!r} recorded, {b!r} replayed" for k, (a, b) in self.mismatches.items())
        lines = [f"step {self.step} does not reproduce: {differing}"]
        if self.first:
            lines.append(f"first difference: rank {self.ranks[0]}, the {self.first}")
        if self.in_forward and len(self.ranks) < self.world_size:
            lines.append(
                f"only rank(s) {', '.join(map(str, self.ranks))} of {self.world_size} computed another forward from "
                "the same weights and data: suspect the hardware of the machine(s) holding them (silent data "
                "corruption) or their environment"
            )
        elif self.in_forward:
            lines.append("every rank's forward differs: the software, settings or data changed, not one machine")
        elif self.first:
            lines.append("every rank's forward agrees: the backward, the gradient reduction or the update differs")
        if self.unrecorded:
            lines.append(
                f"rank(s) {', '.join(map(str, self.unrecorded))} have no readable record of step {self.step} in "
                "fingerprints/rank<R>.jsonl, so they cannot be told apart"
            )
        if self.environment:
            lines.append("this machine differs from the run's: " + "; ".join(self.environment))
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {
            "step": self.step, "reproduced": self.reproduced,
            "mismatches": {k: {"recorded": a, "replayed": b} for k, (a, b) in self.mismatches.items()},
            "ranks": self.ranks, "first": self.first, "environment": self.environment, "unrecorded": self.unrecorded,
        }  # fmt: skip


def recorded_step(run: Path, step: int) -> dict:
    """The metrics record of `step`, which must carry fingerprints (InputError otherwise)."""
    series = load_series(run)
    record = series.get(step)
    if record is None or "grad_fingerprint" not in record:
        fingerprinted = [s for s, r in sorted(series.items()) if "grad_fingerprint" in r]
        near = f"; fingerprinted steps: {_summary(fingerprinted)}" if fingerprinted else ""
        why = "was not logged" if record is None else "was logged without fingerprints"
        raise InputError(
            run / "metrics.jsonl",
            f"step {step} {why}, so there is nothing to compare a replay with{near}",
            "pick a fingerprinted step, or train with --debug.fingerprint (every metrics.log_freq steps)",
        )
    return json_floats(record)


def _summary(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{', '.join(map(str, steps[:8]))}, ... {steps[-1]}"


def reproduce(run: Path, step: int, work: Path) -> Verdict:
    recorded = recorded_step(run, step)
    step_samples(run, step, preview_tokens=0)  # the data must be the run's (one line otherwise), before a launch
    work.mkdir(parents=True, exist_ok=True)
    out = work / "replay"
    launch_replay(run, step, out, mode="verify")
    ranks = read_replay(out)
    replayed = ranks[0] | ranks[0]["fingerprints"]
    verdict = Verdict(step, world_size=len(ranks))
    verdict.mismatches = {
        key: (recorded[key], replayed.get(key)) for key in CHECKED if recorded.get(key) != replayed.get(key)
    }
    verdict.environment = environment_differences(env_for_step(run, step))
    if verdict.reproduced:
        return verdict
    records = {rank: RankFingerprints.read(run, rank, step) for rank in sorted(ranks)}
    verdict.unrecorded = [rank for rank, record in records.items() if record is None]
    for kinds in (("outputs",), ("gradients", "parameters")):  # a rank's own forward first
        for rank, recorded_parts in records.items():
            first = _first_difference(recorded_parts or {}, ranks[rank]["local_digests"], kinds)
            if first:
                verdict.ranks.append(rank)
                verdict.first = verdict.first or first
        if verdict.ranks:
            verdict.in_forward = kinds == ("outputs",)
            break
    return verdict


NOUNS = {"outputs": "forward output", "gradients": "gradient", "parameters": "updated value"}


def _first_difference(recorded: dict, replayed: dict, kinds: tuple[str, ...]) -> str:
    """The first name whose digest differs, in the recorded order (execution order for outputs, model
    order for gradients and parameters)."""
    for kind in kinds:
        theirs = replayed.get(kind, {})
        for name, digest in recorded.get(kind, {}).items():
            if theirs.get(name) != digest:
                module = "" if kind == "outputs" else f" (module {name.rsplit('.', 1)[0]})"
                return f"{NOUNS[kind]} of {name}{module}"
    return ""
