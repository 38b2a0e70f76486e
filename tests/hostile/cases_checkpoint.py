"""Checkpoint step folders: lockstep.json (the manifest), .metadata (DCP's pickle) and the .distcp data,
damaged one way at a time and read by every command that loads a checkpoint.

A damaged newest step is set aside for the older complete one (exit 0, with a notice), or refused in
one line (exit 2). A step that cannot load, with nothing older to fall back to, must be refused."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.hostile import tamper
from tests.hostile.fixtures import Fixtures, resume_argv
from tests.hostile.harness import REFUSED, REFUSED_OR_FELL_BACK, SUBPROCESS_TIMEOUT_S, Case, Outcome
from tests.hostile.tamper import DEEP_LIST, DEEP_OBJECT, LONE_SURROGATE, Raw

MANIFEST = "lockstep.json"
METADATA = ".metadata"
Edit = Callable[[Path, Fixtures], None]
"""Damages one step folder in place."""


@dataclass(frozen=True)
class Damage:
    name: str
    edit: Edit
    fatal: bool = True
    """The step can no longer load: a command on it alone must refuse, and exit 0 needs a fallback notice."""
    subprocess: bool = False
    """Only in a real process: reading it could block forever or fill the memory of the test process."""


def _data_name(step: Path) -> str:
    return max(step.glob("*.distcp"), key=lambda p: p.stat().st_size).name


def _manifest(edit: Callable[[Path], None]) -> Edit:
    return lambda step, fx: edit(step / MANIFEST)


def _data(edit: Callable[[Path], None], refresh: bool = False) -> Edit:
    """Damage the largest data file; with `refresh` the manifest's sizes and checksums are made to match."""

    def damage(step: Path, fx: Fixtures) -> None:
        edit(step / _data_name(step))
        if refresh:
            _refresh(step)

    return damage


def _metadata(edit: Callable[[Path], None], refresh: bool = False) -> Edit:
    def damage(step: Path, fx: Fixtures) -> None:
        edit(step / METADATA)
        if refresh:
            _refresh(step)

    return damage


def _refresh(step: Path) -> None:
    from tests.checkpoint.crafting import refresh_manifest

    refresh_manifest(step)


def _entry(section: str, value: object) -> Edit:
    """files[data file] or checksums[data file] = value."""
    return lambda step, fx: tamper.edit_json(
        step / MANIFEST, lambda d: tamper.set_key(d, (section, _data_name(step)), value)
    )


def _listed(name_of: Callable[[Path, Fixtures], str], size: int = 5) -> Edit:
    """One more entry under "files": a name that points outside the step folder."""
    return lambda step, fx: tamper.edit_json(
        step / MANIFEST, lambda d: tamper.set_key(d, ("files", name_of(step, fx)), size)
    )


def _raw_replace(old: str, new: str) -> Edit:
    """Text surgery for what json.dumps cannot write (a lone surrogate as a key)."""

    def edit(step: Path, fx: Fixtures) -> None:
        path = step / MANIFEST
        path.write_text(path.read_text().replace(old, new, 1))

    return edit


def _payload(step: Path, fx: Fixtures) -> None:
    from tests.checkpoint.crafting import plant_payload

    plant_payload(step, "train_state.step", step.parents[2] / "payload-ran")


def _pickled(value: object) -> Edit:
    return _metadata(tamper.text(pickle.dumps(value)), refresh=True)


def _flip_tensor(step: Path, fx: Fixtures) -> None:
    from tests.checkpoint.crafting import flip_tensor_byte

    flip_tensor_byte(step, "model.output.weight")


def _link_data_to_sentinel(step: Path, fx: Fixtures) -> None:
    tamper.link_to(fx.sentinel)(step / _data_name(step))
    _refresh(step)


def _sentinel_relative(step: Path, fx: Fixtures) -> str:
    return os.path.relpath(fx.sentinel, step)


def _bad(name: str, edit: Edit, **kw) -> Damage:
    return Damage(name, edit, **kw)


def _harmless(name: str, edit: Edit, **kw) -> Damage:
    return Damage(name, edit, fatal=False, **kw)


DAMAGES: list[Damage] = [
    _bad("files-string", _manifest(tamper.setter(("files",), "x"))),
    _bad("files-null", _manifest(tamper.setter(("files",), None))),
    _bad("files-list", _manifest(tamper.setter(("files",), [1, 2]))),
    _bad("files-nested", _entry("files", {"a": {"b": 1}})),
    _bad("files-size-string", _entry("files", "12")),
    _bad("files-size-huge", _entry("files", 10**40)),
    _bad("files-size-negative", _entry("files", -1)),
    _bad("files-size-float", _entry("files", 1.5)),
    _bad("files-size-nan", _entry("files", Raw("NaN"))),
    _bad("files-size-infinity", _entry("files", Raw("Infinity"))),
    _bad("files-size-bool", _entry("files", True)),
    _bad("files-size-2gb", _entry("files", 2 * 2**30)),
    _bad("files-size-5000-digits", _entry("files", Raw("9" * 5000))),
    _bad("files-dotdot-hostname", _listed(lambda s, fx: "../../etc/hostname")),
    _bad("files-relative-sentinel", _listed(_sentinel_relative)),
    _bad("files-absolute-sentinel", _listed(lambda s, fx: str(fx.sentinel))),
    _bad("files-dev-zero", _listed(lambda s, fx: "/dev/zero")),
    _bad("files-proc-self-mem", _listed(lambda s, fx: "/proc/self/mem")),
    _bad("files-nul-in-name", _listed(lambda s, fx: "a\0b")),
    _bad("files-surrogate-name", _raw_replace('"files": {', '"files": {"\\ud800": 5, ')),
    _bad("checksums-string", _manifest(tamper.setter(("checksums",), "x"))),
    _bad("checksums-null", _manifest(tamper.setter(("checksums",), None))),
    _bad("checksums-list", _manifest(tamper.setter(("checksums",), ["x"]))),
    _bad("checksums-int", _entry("checksums", 5)),
    _bad("checksums-not-hex", _entry("checksums", "zz" * 16)),
    _bad("checksums-wrong", _entry("checksums", "0" * 32)),
    _bad("checksums-unlisted-name", _manifest(tamper.setter(("checksums", "../../etc/hostname"), "0" * 32))),
    _bad("missing-files", _manifest(tamper.dropper(("files",)))),
    _harmless("missing-checksums", _manifest(tamper.dropper(("checksums",)))),
    _bad("missing-model", _manifest(tamper.dropper(("model",)))),
    _harmless("missing-fingerprints", _manifest(tamper.dropper(("fingerprints",)))),
    _harmless("missing-config", _manifest(tamper.dropper(("config",)))),
    _harmless("missing-format", _manifest(tamper.dropper(("format",)))),
    _bad("empty-object", _manifest(tamper.text("{}"))),
    _bad("model-string", _manifest(tamper.setter(("model",), "llama3"))),
    _bad("model-null", _manifest(tamper.setter(("model",), None))),
    _bad("model-args-list", _manifest(tamper.setter(("model", "args"), [64, 2]))),
    _harmless("model-dim-string", _manifest(tamper.setter(("model", "args", "dim"), "64"))),  # read as 64
    _bad("model-dim-float-1e300", _manifest(tamper.setter(("model", "args", "dim"), 1e300))),
    _bad("model-n-layers-1e9", _manifest(tamper.setter(("model", "args", "n_layers"), 10**9))),
    _bad("model-n-heads-zero", _manifest(tamper.setter(("model", "args", "n_heads"), 0))),
    _bad("model-vocab-negative", _manifest(tamper.setter(("model", "args", "vocab_size"), -1))),
    _bad("model-vocab-1e13", _manifest(tamper.setter(("model", "args", "vocab_size"), 10**13))),
    _bad("model-max-seq-len-1e12", _manifest(tamper.setter(("model", "args", "max_seq_len"), 10**12))),
    _bad("model-args-unknown-key", _manifest(tamper.setter(("model", "args", "zzz"), 1))),
    _bad("model-name-unknown", _manifest(tamper.setter(("model", "name"), "gpt5"))),
    _bad("model-name-surrogate", _manifest(tamper.setter(("model", "name"), Raw(LONE_SURROGATE)))),
    _bad("fingerprints-string", _manifest(tamper.setter(("fingerprints",), "x"))),
    _harmless("fingerprints-tokenizer-int", _manifest(tamper.setter(("fingerprints", "tokenizer"), 5))),  # eval, to-hf
    _harmless("config-string", _manifest(tamper.setter(("config",), "x"))),
    _harmless("config-model-list", _manifest(tamper.setter(("config", "model"), [1]))),
    _harmless("config-null-value", _manifest(tamper.setter(("config", "job", "description"), None))),
    _harmless("config-deep", _manifest(tamper.setter(("config", "job", "description"), Raw(DEEP_LIST)))),
    _harmless("model-only-string", _manifest(tamper.setter(("model_only",), "yes"))),
    _harmless("parts-string", _manifest(tamper.setter(("parts",), "model"))),
    _harmless("step-string", _manifest(tamper.setter(("step",), "eight"))),
    _harmless("layout-int", _manifest(tamper.setter(("layout",), 5))),
    _harmless("format-string", _manifest(tamper.setter(("format",), "2"))),
    _harmless("format-99", _manifest(tamper.setter(("format",), 99))),
    _harmless("format-null", _manifest(tamper.setter(("format",), None))),
    _bad("manifest-truncated", _manifest(tamper.truncate(0.5))),
    _bad("manifest-empty", _manifest(tamper.text(b""))),
    _bad("manifest-not-utf8", _manifest(tamper.text(tamper.NOT_UTF8))),
    _bad("manifest-top-list", _manifest(tamper.text("[]"))),
    _bad("manifest-top-null", _manifest(tamper.text("null"))),
    _bad("manifest-top-number", _manifest(tamper.text("1e999"))),
    _bad("manifest-deep-list", _manifest(tamper.text(DEEP_LIST))),
    _bad("manifest-deep-object", _manifest(tamper.text(DEEP_OBJECT))),
    _bad("manifest-removed", _manifest(tamper.remove)),
    _bad("manifest-folder", _manifest(tamper.folder_instead)),
    _bad("manifest-link-sentinel", lambda step, fx: tamper.link_to(fx.sentinel)(step / MANIFEST)),
    _bad("manifest-fifo", _manifest(tamper.fifo), subprocess=True),
    _bad("manifest-link-dev-zero", _manifest(tamper.link_to("/dev/zero")), subprocess=True),
    _bad("metadata-truncated", _metadata(tamper.truncate(0.5))),
    _bad("metadata-truncated-refreshed", _metadata(tamper.truncate(0.5), refresh=True)),
    _bad("metadata-garbage-refreshed", _metadata(tamper.text(os.urandom(512)), refresh=True)),
    _bad("metadata-empty-refreshed", _metadata(tamper.text(b""), refresh=True)),
    _bad("metadata-pickled-dict", _pickled({"state_dict_metadata": 5})),
    _bad("metadata-pickled-string", _pickled("metadata")),
    _bad("metadata-pickle-payload", _payload),
    _bad("metadata-dangling-link", _metadata(tamper.link_to(Path("/nonexistent/.metadata")))),
    _bad("metadata-link-sentinel-refreshed", lambda step, fx: _metadata(tamper.link_to(fx.sentinel), True)(step, fx)),
    _bad("metadata-fifo", _metadata(tamper.fifo), subprocess=True),
    _bad("metadata-link-dev-zero", _metadata(tamper.link_to("/dev/zero"), refresh=False), subprocess=True),
    _bad("data-truncated", _data(tamper.truncate(0.5))),
    _harmless("data-truncated-refreshed", _data(tamper.truncate(0.5), refresh=True)),
    _bad("data-empty-refreshed", _data(tamper.text(b""), refresh=True)),
    _bad("data-flipped", _data(tamper.flip())),
    _bad("data-tensor-byte-flipped", _flip_tensor),
    _harmless("data-flipped-refreshed", _data(tamper.flip(0.99), refresh=True)),
    _harmless("data-extended-refreshed", _data(tamper.append(b"\0" * 4096), refresh=True)),
    _bad("data-removed", _data(tamper.remove)),
    _bad("data-link-sentinel-refreshed", _link_data_to_sentinel),
    _bad("data-fifo", _data(tamper.fifo), subprocess=True),
]


def _copy(work: Path, fx: Fixtures) -> Path:
    return tamper.copy_tree(fx.run, work / "run")


def _steps(run: Path) -> list[Path]:
    return sorted((run / "checkpoint").glob("step-*"))


@dataclass(frozen=True)
class Command:
    name: str
    argv: Callable[[Path, Path, Fixtures], list[str]]
    """(work, run copy, fixtures) -> argv."""
    all_steps: bool = False
    """Damage every step (nothing to fall back to), not only the newest."""
    direct: bool = False
    """Point the command at the damaged step folder itself."""
    fast: bool = True
    fast_damages: frozenset[str] | None = None
    """Only these damages in the fast subset (a resume costs a trainer start); None: all."""


RESUME_FAST = frozenset({
    "files-string", "format-null", "files-dotdot-hostname", "files-surrogate-name", "files-size-5000-digits", "checksums-wrong",
    "missing-model", "model-string", "fingerprints-tokenizer-int", "config-deep", "manifest-truncated",
    "manifest-deep-list", "manifest-link-sentinel", "metadata-garbage-refreshed", "metadata-pickle-payload",
    "data-flipped", "data-link-sentinel-refreshed",
})  # fmt: skip


def _generate(target: Path) -> list[str]:
    return ["generate", target, "--prompt", "hi", "--max-new-tokens", "2"]


COMMANDS = [
    Command("generate", lambda w, run, fx: _generate(run)),
    Command("generate-step", lambda w, run, fx: _generate(_steps(run)[-1]), direct=True),
    Command("train-resume", lambda w, run, fx: resume_argv(w), fast_damages=RESUME_FAST),
    Command("train-resume-all-damaged", lambda w, run, fx: resume_argv(w), all_steps=True, fast=False),
    Command("eval", lambda w, run, fx: ["eval", run, "--validation.steps", "1"], fast=False),
    Command("to-hf", lambda w, run, fx: ["convert", "to-hf", run, w / "hf-out"], fast=False),
]


def _builder(damage: Damage, command: Command) -> Callable[[Path, Fixtures], list[str]]:
    def build(work: Path, fx: Fixtures) -> list[str]:
        run = _copy(work, fx)
        steps = _steps(run)
        for step in steps if command.all_steps else steps[-1:]:
            damage.edit(step, fx)
        return command.argv(work, run, fx)

    return build


def _fell_back(work: Path, outcome: Outcome) -> list[str]:
    """Exit 0 on a step that cannot load is right only when the command said it used an older one."""
    said = re.search(r"skipp|unloadable|set aside|damaged", outcome.stdout + outcome.stderr, re.IGNORECASE)
    return [] if outcome.code != 0 or said else ["exit 0 without a notice that the damaged step was skipped"]


def _payload_did_not_run(work: Path, outcome: Outcome) -> list[str]:
    return ["the pickled payload ran (payload-ran was created)"] if (work / "payload-ran").exists() else []


def _checks(damage: Damage) -> Callable[[Path, Outcome], list[str]] | None:
    checks = ([_fell_back] if damage.fatal else []) + (
        [_payload_did_not_run] if damage.name.endswith("payload") else []
    )
    if not checks:
        return None
    return lambda work, outcome: [p for check in checks for p in check(work, outcome)]


def cases() -> list[Case]:
    found = []
    for damage in DAMAGES:
        for command in COMMANDS:
            alone = command.all_steps or command.direct
            expect = REFUSED if (alone and damage.fatal) else REFUSED_OR_FELL_BACK
            found.append(
                Case(
                    id=f"checkpoint-{damage.name}-{command.name}",
                    group="checkpoint",
                    build=_builder(damage, command),
                    expect=expect,
                    fast=command.fast
                    and not damage.subprocess
                    and (command.fast_damages is None or damage.name in command.fast_damages),
                    subprocess=damage.subprocess,
                    timeout_s=SUBPROCESS_TIMEOUT_S if damage.subprocess else 60.0,
                    check=_checks(damage),
                )
            )
    return found
