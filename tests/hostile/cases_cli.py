"""Every number a subcommand takes on its own command line (argparse options), with hostile values, and
the paths compare writes or checks out. A value the option cannot mean is refused in one line; one it
can mean (documented per row) may run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.helpers import tiny_overrides
from tests.hostile import tamper
from tests.hostile.fixtures import Fixtures
from tests.hostile.harness import REFUSED, Case

R = REFUSED
A = frozenset({0, 2})
"""Accepted (the option can mean it) or refused."""
E = frozenset({0, 1, 2})
"""Commands with a documented exit 1 (estimate: does not fit; compare under a gate: a difference)."""
HUGE = str(2**63)
Argv = Callable[[Path, Fixtures, str], list[str]]


def _generate(option: str) -> Argv:
    return lambda w, fx, v: ["generate", fx.run, "--prompt", "hi", "--max-new-tokens", "2", option, v]


def _compare(option: str) -> Argv:
    def argv(w: Path, fx: Fixtures, v: str) -> list[str]:
        return ["compare", fx.run, tamper.copy_tree(fx.run, w / "copy"), option, v]

    return argv


def _prepare(option: str) -> Argv:
    return lambda w, fx, v: [
        "data", "prepare", "--dataset", "json", "--dataset-path", fx.texts, "--tokenizer", "bytes",
        "--out", w / "prepared", "--no-progress", *(["--workers", "1"] if option != "--workers" else []), option, v,
    ]  # fmt: skip


def _estimate(option: str) -> Argv:
    return lambda w, fx, v: ["estimate", "--config", "llama3_debug", "--device", "cpu", "--no-advice",
                             *([] if option.startswith("--nproc") or option == "--nnodes" else ["--nproc", "1"]),
                             option, v]  # fmt: skip


def _audit(w: Path, fx: Fixtures, v: str) -> list[str]:
    return ["audit", "--config", "llama3_debug", *tiny_overrides(w), "--steps", v]


def _lighthouse(option: str) -> Argv:
    return lambda w, fx, v: ["lighthouse", "--port", "0", "--bind", "127.0.0.1", option, v]


ROWS: list[tuple[str, Argv, dict[str, frozenset[int]], dict[str, bool]]] = [
    ("generate --max-new-tokens", _generate("--max-new-tokens"),
     {"nan": R, "1e9": R, "-1": R, HUGE: R, "1000000000": R, "abc": R, "0": A}, {}),
    ("generate --temperature", _generate("--temperature"),
     {"nan": R, "inf": A, "-inf": R, "-1": R, "1e300": A, "abc": R, "0": A}, {}),
    ("generate --top-k", _generate("--top-k"), {"-1": R, "nan": R, HUGE: A, "0": A}, {}),
    ("generate --top-p", _generate("--top-p"), {"0": R, "-1": R, "nan": R, "inf": R, "1.5": R, "abc": R}, {}),
    ("generate --seed", _generate("--seed"), {"-1": A, HUGE: A, "nan": R, "abc": R}, {}),
    ("generate --batch-size", _generate("--batch-size"), {"0": R, "-1": R, "nan": R, HUGE: A}, {}),
    ("train --nproc", lambda w, fx, v: ["train", "--config", "llama3_debug", *tiny_overrides(w), "--nproc", v],
     {"0": R, "-1": R, "nan": R, "abc": R, HUGE: R, "100000": R}, {"launches": False}),
    ("eval --nproc", lambda w, fx, v: ["eval", fx.run, "--nproc", v],
     {"0": R, "-1": R, "nan": R, HUGE: R, "100000": R}, {"launches": False}),
    ("convert from-hf --nproc", lambda w, fx, v: ["convert", "from-hf", fx.hf, w / "out", "--nproc", v],
     {"0": R, "-1": R, "nan": R, HUGE: R}, {"launches": False}),
    ("convert to-hf --max-shard-bytes", lambda w, fx, v: ["convert", "to-hf", fx.run, w / "out", "--max-shard-bytes", v],
     {"0": R, "-1": R, "nan": R, "abc": R, HUGE: A, "1": A}, {}),
    ("compare --rtol", _compare("--rtol"), {"nan": R, "-1": R, "abc": R, "inf": E}, {}),
    ("compare --atol", _compare("--atol"), {"nan": R, "-1": R, "-inf": R, "inf": E}, {}),
    ("data prepare --workers", _prepare("--workers"), {"-1": R, "nan": R, HUGE: A}, {"fast": False}),
    ("data prepare --tokenizer-threads", _prepare("--tokenizer-threads"), {"-1": R, "nan": R, HUGE: A}, {}),
    ("data prepare --num-jobs", _prepare("--num-jobs"), {"0": R, "-1": R, "nan": R, HUGE: A}, {}),
    ("data prepare --job-index", _prepare("--job-index"), {"-1": R, HUGE: R, "nan": R}, {}),
    ("data prepare --shard-mb", _prepare("--shard-mb"),
     {"nan": R, "inf": R, "-inf": R, "-1": R, "0": R, "abc": R, "1e300": A}, {}),
    ("data prepare --shard-mb tiny", _prepare("--shard-mb"), {"1e-300": A}, {"fast": False}),
    ("inspect --step", lambda w, fx, v: ["inspect", fx.run, "--step", v],
     {"-1": R, "0": R, HUGE: R, "nan": R, "999": R}, {}),
    ("inspect --preview-tokens", lambda w, fx, v: ["inspect", fx.run, "--step", "6", "--preview-tokens", v],
     {"-1": R, "nan": R, HUGE: A, "0": A}, {}),
    ("replay --step", lambda w, fx, v: ["replay", fx.run, "--step", v], {"-1": R, "0": R, HUGE: R, "nan": R, "999": R}, {}),
    ("estimate --nproc", _estimate("--nproc"), {"0": R, "-1": R, "nan": R, HUGE: E}, {"fast": False}),
    ("estimate --nnodes", _estimate("--nnodes"), {"0": R, "-1": R, HUGE: E}, {"fast": False}),
    ("estimate --nproc-per-node", _estimate("--nproc-per-node"), {"0": R, "-1": R, HUGE: E}, {"fast": False}),
    *((f"estimate {flag}", _estimate(flag), {"nan": R, "-1": R, "0": R, "inf": E, "1e300": E}, {"fast": False})
      for flag in ("--device-memory", "--peak-tflops", "--hbm-gbps", "--intra-node-gbps", "--inter-node-gbps")),
    ("estimate --vocab-size", _estimate("--vocab-size"), {"0": R, "-1": R, "nan": R, HUGE: E}, {"fast": False}),
    ("audit --steps", _audit, {"nan": R, "abc": R}, {}),
    ("audit --steps run", _audit, {"-1": E, "0": E}, {"fast": False}),
    *((f"lighthouse {flag}", _lighthouse(flag), {"-1": R, "nan": R}, {"fast": False, "subprocess": True})
      for flag in ("--min-replicas", "--join-timeout-ms", "--heartbeat-timeout-ms")),
    ("lighthouse --port", lambda w, fx, v: ["lighthouse", "--port", v], {"-1": R, "70000": R, "nan": R}, {}),
]  # fmt: skip


def _compare_paths() -> list[Case]:
    def plot(name: str) -> Callable[[Path, Fixtures], list[str]]:
        return lambda w, fx: ["compare", fx.run, tamper.copy_tree(fx.run, w / "copy"), "--plot", w / name]

    def run(*more: str) -> Callable[[Path, Fixtures], list[str]]:
        return lambda w, fx: ["compare", "--run", "--config", "llama3_debug", *more, "--out", w / "out"]

    return [
        Case(id="cli-compare-plot-missing-folder", group="cli", build=plot("missing/folder/plot.png")),
        Case(id="cli-compare-plot-unknown-suffix", group="cli", build=plot("plot.xyz")),
        Case(id="cli-compare-plot-is-a-folder", group="cli", build=plot(".")),
        Case(
            id="cli-compare-run-bad-revisions", group="cli", build=run("--rev", "no-such-rev-1", "--rev", "no-such-2")
        ),
        Case(id="cli-compare-run-one-config", group="cli", build=run()),
    ]


def _label(value: str) -> str:
    return {HUGE: "2e63", "-1": "neg-1", "-inf": "neg-inf"}.get(value, value)


def cases() -> list[Case]:
    found = []
    for name, argv, values, options in ROWS:
        slug = name.replace(" --", "-").replace(" ", "-")
        for value, expect in values.items():
            found.append(
                Case(
                    id=f"cli-{slug}={_label(value)}",
                    group="cli",
                    build=lambda w, fx, a=argv, v=value: a(w, fx, v),
                    expect=expect,
                    timeout_s=60.0,
                    **options,
                )
            )
    return found + _compare_paths()
