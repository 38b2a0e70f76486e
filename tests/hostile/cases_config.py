"""Config numbers: every numeric ``--section.key`` (enumerated from the section dataclasses, and every
numeric argument of the llama3 model through ``--model.overrides``) with each hostile value, config
TOML files that TOML allows but lockstep should not, override syntax, and the specific absurd sizes of
issue 25.

Each numeric key goes through the launcher's checks (``train --nproc 1`` with torchrun replaced by a
stand-in: exit 0 means accepted) in the fast subset; the benchmark also trains two real steps with it
and estimates it, where a value the checks accepted must not crash later."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path

from tests.helpers import tiny_overrides
from tests.hostile.fixtures import Fixtures
from tests.hostile.harness import REFUSED, Case
from tests.hostile.tamper import DEEP_LIST

VALUES = ("nan", "inf", "-inf", "-1", "0", "1e300", str(2**63), "abc")
"""Hostile spellings of a number: each is refused in one line or is a value the key accepts."""
ACCEPTED_OR_REFUSED = frozenset({0, 2})
ESTIMATE_CODES = frozenset({0, 1, 2})
"""estimate: 0 fits, 1 does not fit (documented), 2 refused."""


def _numeric(hint: object) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_numeric(a) for a in typing.get_args(hint) if a is not type(None))
    return hint in (int, float)


def numeric_keys() -> list[str]:
    """Every ``section.key`` whose type is a number, and ``model.overrides.ARG`` for each numeric
    llama3 argument (the free-form table is checked against the model's args dataclass)."""
    from lockstep.config.job import SECTION_TYPES
    from lockstep.models.llama3.args import Llama3Args

    keys = [
        f"{section}.{name}"
        for section, kind in SECTION_TYPES.items()
        for name, hint in typing.get_type_hints(kind).items()
        if _numeric(hint)
    ]
    model = typing.get_type_hints(Llama3Args)
    return keys + [f"model.overrides.{f.name}" for f in dataclasses.fields(Llama3Args) if _numeric(model[f.name])]


def _label(value: str) -> str:
    return {str(2**63): "2e63", "-inf": "neg-inf", "-1": "neg-1"}.get(value, value)


def gate_argv(work: Path, *pairs: str) -> list[str]:
    """The launcher's checks on the tiny run with `pairs` (``--key``, value, ...)."""
    return ["train", "--config", "llama3_debug", *tiny_overrides(work), "--nproc", "1", *pairs]


def real_argv(work: Path, *pairs: str) -> list[str]:
    return ["train", "--config", "llama3_debug", *tiny_overrides(work), *pairs, "--training.steps", "2"]


def estimate_argv(*pairs: str) -> list[str]:
    return ["estimate", "--config", "llama3_debug", "--nproc", "1", "--device", "cpu", "--no-advice", *pairs]


def _numeric_cases() -> list[Case]:
    found = []
    for key in numeric_keys():
        for value in VALUES:
            pair = (f"--{key}", value)
            tag = f"option-{key}={_label(value)}"
            found += [
                Case(id=f"{tag}-gate", group="option", build=lambda w, fx, p=pair: gate_argv(w, *p),
                     expect=ACCEPTED_OR_REFUSED, launches=False, timeout_s=30.0),
                Case(id=f"{tag}-estimate", group="option-estimate", build=lambda w, fx, p=pair: estimate_argv(*p),
                     expect=ESTIMATE_CODES, fast=False, timeout_s=60.0),
            ]  # fmt: skip
            if key != "training.steps":  # the run's length itself: 2**63 steps is a legitimate, endless run
                found.append(Case(id=f"{tag}-train", group="option-train", build=lambda w, fx, p=pair: real_argv(w, *p),
                                  expect=ACCEPTED_OR_REFUSED, fast=False, subprocess=key.startswith("model.overrides."),
                                  timeout_s=90.0))  # fmt: skip
    return found


# --- config files ---------------------------------------------------------------------------------

TOMLS: list[tuple[str, bytes, frozenset[int]]] = [
    ("deep-array", b"[training]\nsteps = " + DEEP_LIST.encode() + b"\n", REFUSED),
    ("deep-inline-table", b"[training]\nsteps = " + b"{a = " * 20000 + b"1" + b"}" * 20000 + b"\n", REFUSED),
    ("nan-lr", b"[optimizer]\nlr = nan\n", REFUSED),
    ("inf-max-norm", b"[training]\nmax_norm = inf\n", ACCEPTED_OR_REFUSED),
    ("negative-inf-lr", b"[optimizer]\nlr = -inf\n", REFUSED),
    ("huge-int-steps", b"[training]\nsteps = 99999999999999999999999\n", ACCEPTED_OR_REFUSED),
    ("datetime-steps", b"[training]\nsteps = 1979-05-27T07:32:00Z\n", REFUSED),
    ("datetime-lr", b"[optimizer]\nlr = 07:32:00\n", REFUSED),
    ("table-for-number", b"[training]\nsteps = {a = 1}\n", REFUSED),
    ("array-for-number", b"[training]\nseq_len = [32]\n", REFUSED),
    ("bool-for-number", b"[training]\nsteps = true\n", REFUSED),
    ("float-for-int", b"[training]\nsteps = 1.5\n", REFUSED),
    ("surrogate-escape", b'[job]\ndescription = "\\ud800"\n', REFUSED),
    ("not-utf8", b"[job]\ndescription = '\xff'\n", REFUSED),
    ("surrogate-bytes", b"[job]\ndescription = '\xed\xa0\x80'\n", REFUSED),
    ("nul-byte", b"[job]\ndescription = 'a\x00b'\n", REFUSED),
    ("utf8-bom", b"\xef\xbb\xbf[training]\nsteps = 3\n", ACCEPTED_OR_REFUSED),
    ("section-not-table", b"training = 5\n", REFUSED),
    ("array-of-tables", b"[[training]]\nsteps = 3\n", REFUSED),
    ("dotted-key-into-number", b"[training]\nsteps.a = 1\n", REFUSED),
    ("overrides-deep", b"[model.overrides]\ndim = " + DEEP_LIST.encode() + b"\n", REFUSED),
    ("overrides-table", b"[model.overrides]\ndim = {a = 1}\n", REFUSED),
    ("overrides-unknown-key", b"[model.overrides]\nzzz = 1\n", REFUSED),
    ("custom-module-path", b"[job]\ncustom_config_module = '../../etc/passwd'\n", REFUSED),
    ("custom-module-import", b"[job]\ncustom_config_module = 'antigravity'\n", REFUSED),  # would run its code
    ("custom-module-list", b"[job]\ncustom_config_module = ['x']\n", REFUSED),
    ("empty", b"", ACCEPTED_OR_REFUSED),
]


def _toml_builder(content: bytes, command: str) -> Callable[[Path, Fixtures], list[str]]:
    def build(work: Path, fx: Fixtures) -> list[str]:
        path = work / "config.toml"
        path.write_bytes(content)
        if command == "estimate":
            return ["estimate", "--config", path, "--nproc", "1", "--device", "cpu", "--no-advice"]
        return ["train", "--config", path, *tiny_overrides(work), "--nproc", "1"]

    return build


def _special_file_builder(kind: str) -> Callable[[Path, Fixtures], list[str]]:
    def build(work: Path, fx: Fixtures) -> list[str]:
        import os

        path = work / "config.toml"
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "folder":
            path.mkdir()
        else:
            path.symlink_to("/dev/zero")
        return ["train", "--config", path, "--nproc", "1"]

    return build


def _toml_cases() -> list[Case]:
    found = []
    for name, content, expect in TOMLS:
        found += [
            Case(id=f"toml-{name}-gate", group="toml", build=_toml_builder(content, "gate"), expect=expect,
                 launches=False),
            Case(id=f"toml-{name}-estimate", group="toml", build=_toml_builder(content, "estimate"),
                 expect=expect | {1} if 0 in expect else expect, fast=False),
        ]  # fmt: skip
    found.append(Case(id="toml-folder-gate", group="toml", build=_special_file_builder("folder"), launches=False))
    for kind in ("fifo", "link-dev-zero"):
        found.append(Case(id=f"toml-{kind}-gate", group="toml", build=_special_file_builder(kind), fast=False,
                          subprocess=True, timeout_s=60.0))  # fmt: skip
    return found


# --- override syntax and the sizes of issue 25 ----------------------------------------------------

FAULT_TOLERANT = ["--fault_tolerance.enable", "--debug.seed", "7"]

SYNTAX: list[tuple[str, list[str | bytes]]] = [
    ("flag-for-number", ["--training.steps"]),
    ("empty-value", ["--training.steps="]),
    ("no-section", ["--.steps", "3"]),
    ("no-key", ["--training.", "3"]),
    ("only-dashes", ["--", "3"]),
    ("equals-only", ["--=3"]),
    ("unknown-section", ["--zzz.steps", "3"]),
    ("unknown-key", ["--training.zzz", "3"]),
    ("surrogate-key", ["--training.st\udcffeps", "3"]),
    ("surrogate-value", ["--training.steps", "3\udcff"]),
    ("betas-nan", ["--optimizer.betas", "nan,0.9"]),
    ("betas-huge", ["--optimizer.betas", "[1e300, 0.9]"]),
    ("betas-three", ["--optimizer.betas", "0.9,0.9,0.9"]),
    ("betas-deep", ["--optimizer.betas", DEEP_LIST]),
    ("betas-empty", ["--optimizer.betas", "[]"]),
    ("overrides-deep", ["--model.overrides.dim", DEEP_LIST]),
    ("overrides-dotted-deeper", ["--model.overrides.dim.x", "3"]),
    ("hf-config-string", ["--model.hf_config", "x"]),
    ("mixture-deep", ["--data.mixture", DEEP_LIST]),
    ("mixture-weights-nan", ["--data.mixture", "[a.jsonl:nan, b.jsonl:1]"]),
]

SIZES: list[tuple[str, list[str], frozenset[int]]] = [
    ("n-layers-1e9", ["--model.overrides.n_layers", "1000000000"], REFUSED),
    ("dim-1e7", ["--model.overrides.dim", "10000000"], REFUSED),
    ("vocab-1e13", ["--model.overrides.vocab_size", "10000000000000"], REFUSED),
    ("train-timeout-1e14", ["--comm.train_timeout_seconds", "1e14"], REFUSED),
    ("train-timeout-1e14-int", ["--comm.train_timeout_seconds", "100000000000000"], REFUSED),
    ("trace-buf-1e11", ["--comm.trace_buf_size", "1e11"], REFUSED),
    ("trace-buf-1e11-int", ["--comm.trace_buf_size", "100000000000"], REFUSED),
    ("lighthouse-not-a-url", [*FAULT_TOLERANT, "--fault_tolerance.lighthouse", "not a url"], REFUSED),
    ("seq-len-1e9", ["--training.seq_len", "1000000000"], ACCEPTED_OR_REFUSED),
    ("local-batch-1e9", ["--training.local_batch_size", "1000000000"], ACCEPTED_OR_REFUSED),
    ("validation-batch-1e5", ["--validation.enable", "--validation.local_batch_size", "100000"], ACCEPTED_OR_REFUSED),
]
"""(name, overrides, what the launcher's checks may answer: a size only the data can refute is accepted
there, and must be refused by the real run)."""


def _syntax_cases() -> list[Case]:
    found = [
        Case(id=f"syntax-{name}-gate", group="syntax", build=lambda w, fx, p=pairs: gate_argv(w, *p), launches=False)
        for name, pairs in SYNTAX
    ]
    found.append(Case(id="syntax-not-utf8-argv-subprocess", group="syntax", subprocess=True, build=lambda w, fx: [
        "train", "--config", "llama3_debug", "--training.steps", b"\xff\xfe"]))  # fmt: skip
    for name, pairs, gate in SIZES:
        model = "--model.overrides." in pairs[0]
        found += [
            Case(id=f"size-{name}-gate", group="size", build=lambda w, fx, p=pairs: gate_argv(w, *p), expect=gate,
                 launches=False),
            Case(id=f"size-{name}-estimate", group="size", build=lambda w, fx, p=pairs: estimate_argv(*p),
                 expect=frozenset({1, 2}) if model else ESTIMATE_CODES, fast=False),
            Case(id=f"size-{name}-train", group="size", build=lambda w, fx, p=pairs: real_argv(w, *p), fast=False,
                 subprocess=True, timeout_s=90.0),
        ]  # fmt: skip
    found.append(Case(id="size-eval-validation-batch-1e5", group="size",
                      build=lambda w, fx: ["eval", fx.run, "--validation.local_batch_size", "100000"]))  # fmt: skip
    return found


def cases() -> list[Case]:
    return _numeric_cases() + _toml_cases() + _syntax_cases()
