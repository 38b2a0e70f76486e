"""Property-based hostile cases (hypothesis): any node of a JSON file lockstep reads replaced by any JSON
value, and any numeric option given any spelling of a number, must keep the harness contract.

Each example is an ordinary Case, so failures read like the catalogue's. Examples never raise inside
hypothesis: every verdict is collected (no shrinking), so one run lists every failing example, and the
same examples come back each run (derandomized). The fast subset runs a few per property, the
benchmark many."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.hostile import tamper
from tests.hostile.cases_config import gate_argv, numeric_keys
from tests.hostile.fixtures import Fixtures, prepared_train_argv, resume_argv
from tests.hostile.harness import REFUSED_OR_FELL_BACK, Case, Verdict, run_case

HOSTILE_STRINGS = ["\ud800", "../../etc/hostname", "/dev/zero", "/proc/self/mem", "", "a\0b", "NaN", "é語"]
HOSTILE_NUMBERS = [2**31, 2**63, -(2**63), 10**30, float("nan"), float("inf"), float("-inf"), 1e300, -0.0]

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**12), 2**12),
    st.sampled_from(HOSTILE_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(HOSTILE_STRINGS),
)
"""Integers stay small or absurd: a value in between (hidden_size 30000) would build a model of real,
touched gigabytes inside the test process. The catalogue's subprocess cases cover those sizes."""
json_values = st.recursive(
    leaves, lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)  # fmt: skip
number_spellings = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "1e300", "-0", "0x10", "1_000", "١٢", " 3", "3 ", "", "+5", "1e-300"]),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8).filter(lambda t: not t.startswith("--")),
)


def key_paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """The path of every node (the root too): dict keys and list indices."""
    paths = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            paths += key_paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            paths += key_paths(value, (*prefix, index))
    return paths


@dataclass(frozen=True, kw_only=True)
class JsonProperty:
    """Replace one node of a JSON file in a copied fixture tree with a drawn value, then run a command."""

    name: str
    tree: Callable[[Fixtures], Path]
    """The fixture folder that is copied (into work/tree)."""
    file: str
    """The JSON file, relative to the tree."""
    argv: Callable[[Path, Path, Fixtures], list[str]]
    """(work, copied tree, fixtures) -> argv."""
    expect: frozenset[int]


def _generate(w: Path, tree: Path, fx: Fixtures) -> list[str]:
    return ["generate", tree, "--prompt", "hi", "--max-new-tokens", "2"]


MANIFEST_8 = "checkpoint/step-00000008/lockstep.json"
JSON_PROPERTIES = [
    JsonProperty(name="checkpoint-manifest-generate", tree=lambda fx: fx.run, file=MANIFEST_8, argv=_generate,
                 expect=REFUSED_OR_FELL_BACK),
    JsonProperty(name="checkpoint-manifest-resume", tree=lambda fx: fx.run, file=MANIFEST_8,
                 argv=lambda w, tree, fx: resume_argv(w), expect=REFUSED_OR_FELL_BACK),
    JsonProperty(name="prepared-manifest-train", tree=lambda fx: fx.prepared, file="manifest.json",
                 argv=lambda w, tree, fx: prepared_train_argv(w, tree), expect=REFUSED_OR_FELL_BACK),
    JsonProperty(name="prepared-manifest-verify", tree=lambda fx: fx.prepared, file="manifest.json",
                 argv=lambda w, tree, fx: ["data", "verify", tree], expect=frozenset({0, 1, 2})),
    JsonProperty(name="hf-config-from-hf", tree=lambda fx: fx.hf, file="config.json",
                 argv=lambda w, tree, fx: ["convert", "from-hf", tree, w / "imported"], expect=REFUSED_OR_FELL_BACK),
    JsonProperty(name="hf-config-generate", tree=lambda fx: fx.hf, file="config.json", argv=_generate,
                 expect=REFUSED_OR_FELL_BACK),
]  # fmt: skip


def _tree_name(prop: JsonProperty) -> str:
    return "run" if prop.file.startswith("checkpoint/") else "tree"


def _json_case(prop: JsonProperty, n: int, *, path: tuple, value: Any) -> Case:
    def build(work: Path, fx: Fixtures) -> list[str]:
        tree = tamper.copy_tree(prop.tree(fx), work / _tree_name(prop))
        tamper.edit_json(tree / prop.file, lambda d: tamper.set_key(d, path, value))
        return prop.argv(work, tree, fx)

    shown = json.dumps(value)[:60] if _dumpable(value) else repr(value)[:60]
    return Case(id=f"property-{prop.name}-{n}: {list(path)} = {shown}", group=f"property-{prop.name}", build=build,
                expect=prop.expect, timeout_s=60.0)  # fmt: skip


def _dumpable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _option_case(n: int, key: str, value: str) -> Case:
    return Case(id=f"property-option-gate-{n}: --{key} {value!r}", group="property-option",
                build=lambda w, fx: gate_argv(w, f"--{key}", value), expect=REFUSED_OR_FELL_BACK,
                launches=False)  # fmt: skip


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples, derandomize=True, deadline=None, database=None,
        phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck),
    )  # fmt: skip


def explore_json(prop: JsonProperty, fixtures: Fixtures, work_root: Path, *, examples: int) -> list[Verdict]:
    """Run `examples` drawn cases of `prop`; every verdict, passed or not."""
    document = json.loads((prop.tree(fixtures) / prop.file).read_text())
    paths = key_paths(document)
    verdicts: list[Verdict] = []
    counter = itertools.count()

    @_settings(examples)
    @given(path=st.sampled_from(paths), value=json_values)
    def example(path: tuple, value: Any) -> None:
        n = next(counter)
        verdicts.append(_run(_json_case(prop, n, path=path, value=value), fixtures, work_root / f"{prop.name}-{n}"))

    example()
    return verdicts


def explore_options(fixtures: Fixtures, work_root: Path, *, examples: int) -> list[Verdict]:
    verdicts: list[Verdict] = []
    counter = itertools.count()

    @_settings(examples)
    @given(key=st.sampled_from(numeric_keys()), value=number_spellings)
    def example(key: str, value: str) -> None:
        n = next(counter)
        verdicts.append(_run(_option_case(n, key, value), fixtures, work_root / f"option-{n}"))

    example()
    return verdicts


def _run(case: Case, fixtures: Fixtures, work: Path) -> Verdict:
    """Run one example; its folder is removed once it passed (kept for a failure to look at)."""
    verdict = run_case(case, fixtures, work)
    if verdict.passed:
        shutil.rmtree(work, ignore_errors=True)
    return verdict
