"""The files of a run folder that lockstep reads back (metrics.jsonl, launches/, env.json, config.toml,
the run lock, fingerprints), damaged in a copy of the fixture run, for the commands that read them:
compare (against the intact run), train resuming, inspect, replay, and generate/eval (config.toml)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.hostile import tamper
from tests.hostile.fixtures import Fixtures, resume_argv
from tests.hostile.harness import SUBPROCESS_TIMEOUT_S, Case
from tests.hostile.tamper import DEEP_LIST, DEEP_OBJECT, LONE_SURROGATE

A = frozenset({0, 2})
E = frozenset({0, 1, 2})
"""replay: 1 = the step did not reproduce (documented)."""
Edit = Callable[[Path, Fixtures], None]

COMMANDS: dict[str, tuple[Callable[[Path, Path, Fixtures], list[str]], frozenset[int], bool]] = {
    "compare": (lambda w, run, fx: ["compare", fx.run, run], A, True),
    "train-resume": (lambda w, run, fx: resume_argv(w), A, True),
    "inspect": (lambda w, run, fx: ["inspect", run, "--step", "6"], A, True),
    "replay": (lambda w, run, fx: ["replay", run, "--step", "6"], E, False),
    "generate": (lambda w, run, fx: ["generate", run, "--prompt", "hi", "--max-new-tokens", "2"], A, True),
    "eval": (lambda w, run, fx: ["eval", run, "--validation.steps", "1"], A, False),
}
"""name -> ((work, damaged run, fixtures) -> argv, exit codes, in the fast subset)."""


@dataclass(frozen=True)
class Damage:
    name: str
    edit: Edit
    commands: tuple[str, ...]
    subprocess: bool = False


def _at(relative: str, edit: Callable[[Path], None]) -> Edit:
    return lambda run, fx: edit(run / relative)


def _line(relative: str, index: int, line: str | bytes) -> Edit:
    """Replace one line (0 is the first) of a JSON Lines file."""

    def edit(run: Path, fx: Fixtures) -> None:
        path = run / relative
        lines = path.read_bytes().splitlines(keepends=True)
        lines[index] = (line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")) + b"\n"
        path.write_bytes(b"".join(lines))

    return edit


def _record(relative: str, index: int, key: str, raw: str) -> Edit:
    """Set one key of one JSON Lines record to raw JSON text."""

    def edit(run: Path, fx: Fixtures) -> None:
        path = run / relative
        lines = path.read_text().splitlines()
        record = json.loads(lines[index])
        record[key] = "@@raw@@"
        lines[index] = json.dumps(record).replace('"@@raw@@"', raw)
        path.write_text("\n".join(lines) + "\n")

    return edit


def _swap_lines(relative: str) -> Edit:
    def edit(run: Path, fx: Fixtures) -> None:
        path = run / relative
        lines = path.read_text().splitlines()
        lines[1], lines[3] = lines[3], lines[1]
        path.write_text("\n".join(lines) + "\n")

    return edit


def _checkpoint_not_a_table(path: Path) -> None:
    """``checkpoint = 5`` at the top level, where the [checkpoint] table was."""
    path.write_text("checkpoint = 5\n" + path.read_text().replace("[checkpoint]", "[checkpoint_was_here]"))


def _damages(relative: str, commands: tuple[str, ...], prefix: str) -> list[Damage]:
    """The damages every JSON file of the run can have."""
    return [
        Damage(f"{prefix}-garbage", _at(relative, tamper.text("{not json")), commands),
        Damage(f"{prefix}-deep-list", _at(relative, tamper.text(DEEP_LIST)), commands),
        Damage(f"{prefix}-deep-object", _at(relative, tamper.text(DEEP_OBJECT)), commands),
        Damage(f"{prefix}-top-list", _at(relative, tamper.text("[]")), commands),
        Damage(f"{prefix}-top-null", _at(relative, tamper.text("null")), commands),
        Damage(f"{prefix}-surrogate", _at(relative, tamper.text('{"a": ' + LONE_SURROGATE + "}")), commands),
        Damage(f"{prefix}-not-utf8", _at(relative, tamper.text(b'{"a": "\xff"}')), commands),
        Damage(f"{prefix}-empty", _at(relative, tamper.text(b"")), commands),
        Damage(f"{prefix}-removed", _at(relative, tamper.remove), commands),
        Damage(f"{prefix}-link-sentinel", lambda run, fx: tamper.link_to(fx.sentinel)(run / relative), commands),
    ]


METRICS = "metrics.jsonl"
ON_METRICS = ("compare", "train-resume", "inspect", "replay")
ON_LAUNCHES = ("compare", "train-resume", "inspect", "replay")
ON_ENV = ("compare", "train-resume", "replay")
ON_CONFIG = ("compare", "train-resume", "inspect", "replay", "generate", "eval")
ON_LOCK = ("train-resume", "generate", "eval")
ON_FINGERPRINTS = ("replay", "train-resume")
FINGERPRINTS = "fingerprints/rank0.jsonl"

DAMAGES: list[Damage] = [
    Damage("metrics-garbage-line", _line(METRICS, 2, "{not json"), ON_METRICS),
    Damage("metrics-deep-line", _line(METRICS, 2, DEEP_LIST), ON_METRICS),
    Damage("metrics-deep-object-line", _line(METRICS, 2, DEEP_OBJECT), ON_METRICS),
    Damage("metrics-not-utf8-line", _line(METRICS, 2, b'{"step": 3, "loss": "\xff"}'), ON_METRICS),
    Damage("metrics-surrogate-line", _line(METRICS, 2, '{"step": 3, "loss": ' + LONE_SURROGATE + "}"), ON_METRICS),
    Damage("metrics-record-list", _line(METRICS, 2, "[3, 1.5]"), ON_METRICS),
    Damage("metrics-record-null", _line(METRICS, 2, "null"), ON_METRICS),
    Damage("metrics-step-string", _record(METRICS, 2, "step", '"three"'), ON_METRICS),
    Damage("metrics-step-null", _record(METRICS, 2, "step", "null"), ON_METRICS),
    Damage("metrics-step-huge", _record(METRICS, 2, "step", "1" + "0" * 30), ON_METRICS),
    Damage("metrics-step-5000-digits", _record(METRICS, 2, "step", "9" * 5000), ON_METRICS),
    Damage("metrics-step-nan", _record(METRICS, 2, "step", "NaN"), ON_METRICS),
    Damage("metrics-step-float", _record(METRICS, 2, "step", "3.5"), ON_METRICS),
    Damage("metrics-step-negative", _record(METRICS, 2, "step", "-3"), ON_METRICS),
    Damage("metrics-loss-string", _record(METRICS, 2, "loss", '"low"'), ON_METRICS),
    Damage("metrics-loss-object", _record(METRICS, 2, "loss", '{"a": 1}'), ON_METRICS),
    Damage("metrics-duplicate-step", _line(METRICS, 3, '{"step": 3, "loss": 1.0, "grad_norm": 1.0}'), ON_METRICS),
    Damage("metrics-unsorted", _swap_lines(METRICS), ON_METRICS),
    Damage("metrics-empty", _at(METRICS, tamper.text(b"")), ON_METRICS),
    Damage("metrics-removed", _at(METRICS, tamper.remove), ON_METRICS),
    Damage("metrics-folder", _at(METRICS, tamper.folder_instead), ON_METRICS),
    Damage("metrics-link-sentinel", lambda run, fx: tamper.link_to(fx.sentinel)(run / METRICS), ON_METRICS),
    Damage("metrics-fifo", _at(METRICS, tamper.fifo), ("compare", "train-resume"), subprocess=True),
    *_damages("launches/001/launch.json", ON_LAUNCHES, "launch-record"),
    *_damages("launches/001/env.json", ON_LAUNCHES, "launch-env"),
    Damage("launch-config-garbage", _at("launches/001/config.toml", tamper.text("[training\n")), ON_LAUNCHES),
    Damage("launch-config-deep", _at("launches/001/config.toml", tamper.text("a = " + DEEP_LIST)), ON_LAUNCHES),
    Damage("launches-junk-folder", lambda run, fx: (run / "launches" / "abc").mkdir(), ON_LAUNCHES),
    Damage("launches-huge-number", lambda run, fx: (run / "launches" / ("9" * 200)).mkdir(), ON_LAUNCHES),
    Damage("launches-is-a-file", _at("launches", lambda p: (tamper.remove(p), p.write_text("x"))), ON_LAUNCHES),
    *_damages("env.json", ON_ENV, "env"),
    Damage("config-garbage", _at("config.toml", tamper.text("[training\n")), ON_CONFIG),
    Damage("config-not-utf8", _at("config.toml", tamper.text(b"[job]\ndescription = '\xff'\n")), ON_CONFIG),
    Damage("config-deep", _at("config.toml", tamper.text("a = " + DEEP_LIST)), ON_CONFIG),
    Damage("config-checkpoint-not-a-table", _at("config.toml", _checkpoint_not_a_table), ON_CONFIG),
    Damage(
        "config-checkpoint-folder-escape",
        _at(
            "config.toml",
            lambda p: p.write_text(
                p.read_text()
                .replace("[checkpoint]", "[checkpoint]\nfolder = '../../..'", 1)
                .replace('folder = "checkpoint"', "")
            ),
        ),
        ON_CONFIG,
    ),  # fmt: skip
    Damage("config-removed", _at("config.toml", tamper.remove), ON_CONFIG),
    Damage("config-empty", _at("config.toml", tamper.text(b"")), ON_CONFIG),
    Damage("lock-garbage", _at(".lock", tamper.text("{not json")), ON_LOCK),
    Damage("lock-deep", _at(".lock", tamper.text(DEEP_LIST)), ON_LOCK),
    Damage("lock-not-utf8", _at(".lock", tamper.text(b"\xff\xfe")), ON_LOCK),
    Damage("lock-surrogate", _at(".lock", tamper.text('{"pid": ' + LONE_SURROGATE + "}")), ON_LOCK),
    Damage("lock-pid-huge", _at(".lock", tamper.text('{"pid": ' + "9" * 400 + "}")), ON_LOCK),
    Damage("lock-link-sentinel", lambda run, fx: tamper.link_to(fx.sentinel)(run / ".lock"), ON_LOCK),
    Damage("lock-folder", _at(".lock", tamper.folder_instead), ON_LOCK),
    Damage("lock-fifo", _at(".lock", tamper.fifo), ("train-resume",), subprocess=True),
    Damage("fingerprints-garbage-line", _line(FINGERPRINTS, 1, "{not json"), ON_FINGERPRINTS),
    Damage("fingerprints-deep-line", _line(FINGERPRINTS, 1, DEEP_LIST), ON_FINGERPRINTS),
    Damage("fingerprints-not-utf8", _line(FINGERPRINTS, 1, b"\xff"), ON_FINGERPRINTS),
    Damage("fingerprints-removed", _at(FINGERPRINTS, tamper.remove), ON_FINGERPRINTS),
]


def _builder(damage: Damage, command: str) -> Callable[[Path, Fixtures], list[str]]:
    def build(work: Path, fx: Fixtures) -> list[str]:
        run = tamper.copy_tree(fx.run, work / "run")
        damage.edit(run, fx)
        return COMMANDS[command][0](work, run, fx)

    return build


def cases() -> list[Case]:
    found = []
    for damage in DAMAGES:
        for command in damage.commands:
            _, expect, fast = COMMANDS[command]
            if command == "train-resume":  # a trainer start each: one garbled and one deep file per kind
                fast = "garbage" in damage.name or "deep-list" in damage.name or damage.name.startswith("lock")
            found.append(
                Case(
                    id=f"run-{damage.name}-{command}",
                    group="run-files",
                    build=_builder(damage, command),
                    expect=expect,
                    fast=fast and not damage.subprocess,
                    subprocess=damage.subprocess,
                    timeout_s=SUBPROCESS_TIMEOUT_S if damage.subprocess else 60.0,
                )
            )
    return found
