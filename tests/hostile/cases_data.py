"""Prepared data folders (manifest.json, plan.json, shard tokens, document indexes and records) and the
user datasets they are made from (JSON Lines, JSON, text), damaged one way at a time.

Readers: training on a prepared folder, ``data verify`` (exit 1 documented for shards whose content
differs from the manifest), ``data finalize`` (rewrites the manifest from the plan and shard records),
``data prepare`` into the damaged folder again, and for user datasets ``data prepare`` and training
straight from the file (its cache in the case folder)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np

from tests.helpers import tiny_overrides
from tests.hostile import tamper
from tests.hostile.fixtures import Fixtures, prepared_train_argv
from tests.hostile.harness import REFUSED, REFUSED_OR_FELL_BACK, SUBPROCESS_TIMEOUT_S, Case
from tests.hostile.tamper import DEEP_LIST, DEEP_OBJECT, LONE_SURROGATE, Raw

TRAIN, VERIFY, FINALIZE, PREPARE = "train", "verify", "finalize", "prepare-again"
MAY_DIFFER = frozenset({1, 2})
"""data verify: exit 1 names the files that differ, exit 2 refuses a folder it cannot read."""
Edit = Callable[[Path, Fixtures], None]


@dataclass(frozen=True)
class Damage:
    name: str
    edit: Edit
    refusers: frozenset[str]
    """The commands that read what is damaged and must refuse (verify: or report it, exit 1)."""
    subprocess: bool = False


def _file(name: str, edit: Callable[[Path], None]) -> Edit:
    return lambda folder, fx: edit(folder / name)


def _first_shard(suffix: str, edit: Callable[[Path], None]) -> Edit:
    return lambda folder, fx: edit(folder / "shards" / f"00000.{suffix}")


def _every_shard(suffix: str, edit: Callable[[Path], None]) -> Edit:
    """Every shard, not one: training opens a shard only when a window reads it, so a step must meet one."""

    def damage(folder: Path, fx: Fixtures) -> None:
        for path in sorted((folder / "shards").glob(f"*.{suffix}")):
            edit(path)

    return damage


def _tokens_to_sentinel(folder: Path, fx: Fixtures) -> None:
    for path in sorted((folder / "shards").glob("*.tokens")):
        tamper.link_to(fx.sentinel)(path)


def _ids_above_vocabulary(path: Path) -> None:
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[::16] = np.iinfo(np.uint16).max
    tokens.tofile(path)


def _offsets(values: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        starts = np.fromfile(path, dtype=np.uint64)
        values(starts).astype(np.uint64).tofile(path)

    return edit


def _manifest_shard(key: str, value: object) -> Edit:
    return _file("manifest.json", tamper.setter(("shards", 0, key), value))


def _plan_shard(key: str, value: object) -> Edit:
    return _file("plan.json", tamper.setter(("shards", 0, key), value))


M, P = "manifest.json", "plan.json"
READ_MANIFEST = frozenset({TRAIN, VERIFY})
READ_COUNTS = frozenset({TRAIN})
"""Token counts are checked against the shard sizes at start-up; verify re-hashes content only."""
READ_PLAN = frozenset({FINALIZE})
READ_TOKENS = frozenset({TRAIN, VERIFY, FINALIZE})

PREPARED_DAMAGES: list[Damage] = [
    Damage("manifest-top-list", _file(M, tamper.text("[]")), READ_MANIFEST),
    Damage("manifest-top-null", _file(M, tamper.text("null")), READ_MANIFEST),
    Damage("manifest-truncated", _file(M, tamper.truncate(0.5)), READ_MANIFEST),
    Damage("manifest-empty", _file(M, tamper.text(b"")), READ_MANIFEST),
    Damage("manifest-deep-list", _file(M, tamper.text(DEEP_LIST)), READ_MANIFEST),
    Damage("manifest-deep-object", _file(M, tamper.text(DEEP_OBJECT)), READ_MANIFEST),
    Damage("manifest-not-utf8", _file(M, tamper.text(b'{"format": "\xff"}')), READ_MANIFEST),
    Damage("manifest-format-surrogate", _file(M, tamper.setter(("format",), Raw(LONE_SURROGATE))), READ_MANIFEST),
    Damage("manifest-version-string", _file(M, tamper.setter(("version",), "1")), READ_MANIFEST),
    Damage("manifest-dtype-float64", _file(M, tamper.setter(("dtype",), "float64")), READ_MANIFEST),
    Damage("manifest-dtype-null", _file(M, tamper.setter(("dtype",), None)), READ_MANIFEST),
    Damage("manifest-dtype-list", _file(M, tamper.setter(("dtype",), ["uint16"])), READ_MANIFEST),
    Damage("manifest-shards-string", _file(M, tamper.setter(("shards",), "00000")), READ_MANIFEST),
    Damage("manifest-shards-null", _file(M, tamper.setter(("shards",), None)), READ_MANIFEST),
    Damage("manifest-shards-dict", _file(M, tamper.setter(("shards",), {"name": "00000"})), READ_MANIFEST),
    Damage("manifest-shard-entry-string", _file(M, tamper.setter(("shards", 0), "00000")), READ_MANIFEST),
    Damage("manifest-shard-entry-null", _file(M, tamper.setter(("shards", 0), None)), READ_MANIFEST),
    Damage("manifest-shard-name-dotdot", _manifest_shard("name", "../../../etc/hostname"), READ_MANIFEST),
    Damage("manifest-shard-name-absolute", _manifest_shard("name", "/etc/hostname"), READ_MANIFEST),
    Damage("manifest-shard-name-int", _manifest_shard("name", 0), READ_MANIFEST),
    Damage("manifest-shard-name-missing", _file(M, tamper.dropper(("shards", 0, "name"))), READ_MANIFEST),
    Damage("manifest-shard-tokens-negative", _manifest_shard("tokens", -1), READ_COUNTS),
    Damage("manifest-shard-tokens-string", _manifest_shard("tokens", "18181"), READ_COUNTS),
    Damage("manifest-shard-tokens-huge", _manifest_shard("tokens", 10**20), READ_COUNTS),
    Damage("manifest-shard-tokens-float", _manifest_shard("tokens", 1.5), READ_COUNTS),
    Damage("manifest-shard-tokens-nan", _manifest_shard("tokens", Raw("NaN")), READ_COUNTS),
    Damage("manifest-shard-tokens-missing", _file(M, tamper.dropper(("shards", 0, "tokens"))), READ_COUNTS),
    Damage("manifest-shard-checksum-int", _manifest_shard("tokens_xxh3", 5), frozenset({VERIFY})),
    Damage("manifest-tokenizer-null", _file(M, tamper.setter(("tokenizer",), None)), READ_MANIFEST),
    Damage("manifest-tokenizer-string", _file(M, tamper.setter(("tokenizer",), "bytes")), READ_MANIFEST),
    Damage("manifest-tokenizer-kind-missing", _file(M, tamper.dropper(("tokenizer", "kind"))), frozenset({VERIFY})),
    Damage("manifest-tokenizer-kind-hf", _file(M, tamper.setter(("tokenizer", "kind"), "hf")), frozenset({VERIFY})),
    Damage("manifest-tokenizer-fingerprint-int", _file(M, tamper.setter(("tokenizer", "fingerprint"), 5)), READ_COUNTS),
    Damage("manifest-fingerprint-int", _file(M, tamper.setter(("fingerprint",), 5)), frozenset()),
    Damage("manifest-num-tokens-string", _file(M, tamper.setter(("num_tokens",), "many")), frozenset()),
    Damage("manifest-removed", _file(M, tamper.remove), READ_MANIFEST),
    Damage("manifest-folder", _file(M, tamper.folder_instead), READ_MANIFEST),
    Damage("manifest-link-sentinel", lambda folder, fx: tamper.link_to(fx.sentinel)(folder / M), READ_MANIFEST),
    Damage("manifest-fifo", _file(M, tamper.fifo), READ_MANIFEST, subprocess=True),
    Damage("plan-top-list", _file(P, tamper.text("[]")), READ_PLAN),
    Damage("plan-deep-list", _file(P, tamper.text(DEEP_LIST)), READ_PLAN),
    Damage("plan-truncated", _file(P, tamper.truncate(0.5)), READ_PLAN),
    Damage("plan-dtype-unknown", _file(P, tamper.setter(("dtype",), "float128")), READ_PLAN),
    Damage("plan-dtype-null", _file(P, tamper.setter(("dtype",), None)), READ_PLAN),
    Damage("plan-shards-null", _file(P, tamper.setter(("shards",), None)), READ_PLAN),
    Damage("plan-shards-strings", _file(P, tamper.setter(("shards",), ["00000"])), READ_PLAN),
    Damage("plan-shard-name-dotdot", _plan_shard("name", "../../../sentinel/secret"), READ_PLAN),
    Damage("plan-shard-name-absolute", _plan_shard("name", "/etc/hostname"), READ_PLAN),
    Damage("plan-shard-end-huge", _plan_shard("end", 10**30), frozenset()),
    Damage("plan-source-null", _file(P, tamper.setter(("source",), None)), READ_PLAN),
    Damage("plan-tokenizer-missing", _file(P, tamper.dropper(("tokenizer",))), READ_PLAN),
    Damage("plan-removed", _file(P, tamper.remove), READ_PLAN),
    Damage("tokens-truncated", _every_shard("tokens", tamper.truncate(0.5)), READ_TOKENS),
    Damage("tokens-empty", _every_shard("tokens", tamper.text(b"")), READ_TOKENS),
    Damage("tokens-removed", _every_shard("tokens", tamper.remove), READ_TOKENS),
    Damage("tokens-odd-byte-count", _every_shard("tokens", tamper.append(b"\0")), READ_TOKENS),
    Damage("tokens-ids-above-vocabulary", _every_shard("tokens", _ids_above_vocabulary), frozenset({TRAIN, VERIFY})),
    Damage("tokens-link-sentinel", _tokens_to_sentinel, READ_TOKENS),
    Damage("tokens-folder", _every_shard("tokens", tamper.folder_instead), READ_TOKENS),
    Damage("tokens-fifo", _every_shard("tokens", tamper.fifo), READ_TOKENS, subprocess=True),
    Damage("docs-truncated", _every_shard("docs", tamper.truncate(0.5)), frozenset({VERIFY})),
    Damage("docs-offsets-huge", _every_shard("docs", _offsets(lambda s: np.full_like(s, 2**63))), frozenset({VERIFY})),
    Damage("docs-offsets-reversed", _every_shard("docs", _offsets(lambda s: s[::-1])), frozenset({VERIFY})),
    Damage("docs-odd-byte-count", _every_shard("docs", tamper.append(b"\1")), frozenset({VERIFY})),
    Damage("docs-removed", _every_shard("docs", tamper.remove), frozenset({VERIFY})),
    Damage("record-garbage", _first_shard("json", tamper.text("{not json")), frozenset()),
    Damage("record-deep", _first_shard("json", tamper.text(DEEP_LIST)), frozenset()),
    Damage("record-list", _first_shard("json", tamper.text("[]")), frozenset()),
    Damage("record-tokens-string", _first_shard("json", tamper.setter(("tokens",), "x")), frozenset()),
    Damage("record-name-dotdot", _first_shard("json", tamper.setter(("name",), "../../x")), frozenset()),
    Damage("tokenizer-marker-removed", _file("tokenizer.bytes", tamper.remove), frozenset()),
    Damage("lock-garbage", _file(".prepare-job-0-of-1.lock", tamper.text(DEEP_LIST)), frozenset()),
    Damage(
        "lock-link-sentinel", lambda f, fx: tamper.link_to(fx.sentinel)(f / ".prepare-job-0-of-1.lock"), frozenset()
    ),
]


def _prepare(dataset: str, path: Path, out: Path) -> list[str]:
    return ["data", "prepare", "--dataset", dataset, "--dataset-path", path, "--tokenizer", "bytes", "--out", out,
            "--workers", "1", "--shard-mb", "0.02", "--no-progress"]  # fmt: skip


PREPARED_COMMANDS: dict[str, Callable[[Path, Path, Fixtures], list[str]]] = {
    TRAIN: lambda work, folder, fx: prepared_train_argv(work, folder),
    VERIFY: lambda work, folder, fx: ["data", "verify", folder],
    FINALIZE: lambda work, folder, fx: ["data", "finalize", folder],
    PREPARE: lambda work, folder, fx: _prepare("json", fx.texts, folder),
}


def _expect(command: str, damage: Damage) -> frozenset[int]:
    if command == VERIFY:
        return MAY_DIFFER if command in damage.refusers else frozenset({0, 1, 2})
    return REFUSED if command in damage.refusers else REFUSED_OR_FELL_BACK


def _prepared_builder(damage: Damage, command: str) -> Callable[[Path, Fixtures], list[str]]:
    def build(work: Path, fx: Fixtures) -> list[str]:
        folder = tamper.copy_tree(fx.prepared, work / "prepared")
        damage.edit(folder, fx)
        return PREPARED_COMMANDS[command](work, folder, fx)

    return build


# --- user datasets -------------------------------------------------------------------------------

GOOD = '{"text": "' + "a document of words " * 10 + '"}'


@dataclass(frozen=True)
class Dataset:
    name: str
    suffix: str
    """jsonl or json (read as json), txt (read as text)."""
    content: bytes
    _: KW_ONLY
    expect: frozenset[int] = REFUSED
    empty: bool = False
    """No documents: preparing nothing may succeed, training on nothing must be refused."""

    @property
    def kind(self) -> str:
        return "text" if self.suffix == "txt" else "json"


def _lines(*lines: str | bytes) -> bytes:
    encoded = (line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass") for line in lines)
    return b"".join(line + b"\n" for line in encoded)


OK_OR_REFUSED = frozenset({0, 2})
X80 = "x" * 80
"""Enough text that the document alone fills a window."""

DATASETS: list[Dataset] = [
    Dataset("jsonl-surrogate-text", "jsonl", _lines(GOOD, '{"text": "a \\ud800 ' + X80 + '"}'), expect=OK_OR_REFUSED),
    Dataset(
        "jsonl-surrogate-key", "jsonl", _lines(GOOD, '{"\\udfff": 1, "text": "' + X80 + '"}'), expect=OK_OR_REFUSED
    ),
    Dataset("jsonl-deep-line", "jsonl", _lines(GOOD, DEEP_LIST)),
    Dataset("jsonl-deep-object-line", "jsonl", _lines(GOOD, DEEP_OBJECT)),
    Dataset("jsonl-deep-text-value", "jsonl", _lines(GOOD, '{"text": ' + DEEP_LIST + "}")),
    Dataset("jsonl-not-utf8", "jsonl", _lines(GOOD, b'{"text": "caf\xe9 ' + X80.encode() + b'"}')),
    Dataset("jsonl-surrogate-bytes", "jsonl", _lines(GOOD, b'{"text": "\xed\xa0\x80 ' + X80.encode() + b'"}')),
    Dataset("jsonl-record-list", "jsonl", _lines(GOOD, "[1, 2]")),
    Dataset("jsonl-record-number", "jsonl", _lines(GOOD, "1e999")),
    Dataset("jsonl-record-string", "jsonl", _lines(GOOD, '"text"')),
    Dataset("jsonl-record-null", "jsonl", _lines(GOOD, "null")),
    Dataset("jsonl-missing-text", "jsonl", _lines(GOOD, '{"body": "no text"}')),
    Dataset("jsonl-text-null", "jsonl", _lines(GOOD, '{"text": null}')),
    Dataset("jsonl-text-number", "jsonl", _lines(GOOD, '{"text": 1e999}')),
    Dataset("jsonl-text-object", "jsonl", _lines(GOOD, '{"text": {"a": 1}}')),
    Dataset("jsonl-huge-int", "jsonl", _lines(GOOD, '{"text": "t", "n": ' + "9" * 5000 + "}")),
    Dataset("jsonl-truncated-line", "jsonl", _lines(GOOD, '{"text": "cut')),
    Dataset("jsonl-empty", "jsonl", b"", empty=True),
    Dataset("jsonl-blank-lines-only", "jsonl", b"\n\n\n", empty=True),
    Dataset("jsonl-utf8-bom", "jsonl", b"\xef\xbb\xbf" + _lines(GOOD, GOOD), expect=OK_OR_REFUSED),
    Dataset("jsonl-nul-bytes", "jsonl", _lines(GOOD, b"\0\0\0" + GOOD.encode()), expect=OK_OR_REFUSED),
    Dataset("jsonl-crlf", "jsonl", (GOOD + "\r\n" + GOOD + "\r\n").encode(), expect=OK_OR_REFUSED),
    Dataset("json-deep", "json", DEEP_LIST.encode()),
    Dataset("json-object-not-array", "json", GOOD.encode(), expect=OK_OR_REFUSED),
    Dataset("json-array-of-strings", "json", b'["a", "b"]'),
    Dataset(
        "json-surrogate", "json", ("[" + GOOD + ', {"text": "\\ud800' + X80 + '"}]').encode(), expect=OK_OR_REFUSED
    ),
    Dataset("json-not-utf8", "json", b'[{"text": "\xff\xfe"}]'),
    Dataset("text-not-utf8", "txt", b"first line\ncaf\xe9 au lait\n" * 20),
    Dataset("text-surrogate-bytes", "txt", b"words \xed\xa0\x80 words\n" * 20),
    Dataset("text-nul-bytes", "txt", b"words\0words " * 200, expect=OK_OR_REFUSED),
    Dataset("text-empty", "txt", b"", empty=True),
]


def _dataset_expect(dataset: Dataset, command: str) -> frozenset[int]:
    if dataset.empty:
        return REFUSED if command == "train" else OK_OR_REFUSED
    return dataset.expect


def _dataset_builder(dataset: Dataset, command: str) -> Callable[[Path, Fixtures], list[str]]:
    def build(work: Path, fx: Fixtures) -> list[str]:
        path = work / f"data.{dataset.suffix}"
        path.write_bytes(dataset.content)
        if command == "prepare":
            return _prepare(dataset.kind, path, work / "prepared")
        return [
            "train", "--config", "llama3_debug", *tiny_overrides(work), "--model.tokenizer", "bytes",
            "--training.dataset", dataset.kind, "--training.dataset_path", path,
            "--data.cache_folder", work / "cache", "--training.steps", "1",
        ]  # fmt: skip

    return build


def cases() -> list[Case]:
    found = []
    for damage in PREPARED_DAMAGES:
        for command in PREPARED_COMMANDS:
            found.append(
                Case(
                    id=f"prepared-{damage.name}-{command}",
                    group="prepared",
                    build=_prepared_builder(damage, command),
                    expect=_expect(command, damage),
                    fast=not damage.subprocess,
                    subprocess=damage.subprocess,
                    timeout_s=SUBPROCESS_TIMEOUT_S if damage.subprocess else 60.0,
                )
            )
    for dataset in DATASETS:
        for command in ("prepare", "train"):
            found.append(
                Case(
                    id=f"dataset-{dataset.name}-{command}",
                    group="dataset",
                    build=_dataset_builder(dataset, command),
                    expect=_dataset_expect(dataset, command),
                    timeout_s=60.0,
                )
            )
    return found
