"""Hugging Face folders: config.json fields of the wrong type or an absurd size, or that disagree with the
weights, and model.safetensors headers that lie; read by from-hf, generate, eval and training's initial
load (flavor from_hf, and a flavor whose shape is checked against the folder)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import tiny_overrides
from tests.hostile import tamper
from tests.hostile.fixtures import Fixtures
from tests.hostile.harness import REFUSED, SUBPROCESS_TIMEOUT_S, Case
from tests.hostile.tamper import DEEP_LIST, DEEP_OBJECT, LONE_SURROGATE, Raw

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
Edit = Callable[[Path, Fixtures], None]
"""Damages one copy of the Hugging Face folder in place."""
OK_OR_REFUSED = frozenset({0, 2})
"""A field lockstep may ignore (it does not shape the model it builds)."""


@dataclass(frozen=True)
class Damage:
    name: str
    edit: Edit
    expect: frozenset[int] = REFUSED
    subprocess: bool = False


def _config(edit: Callable[[Path], None]) -> Edit:
    return lambda folder, fx: edit(folder / CONFIG)


def _field(key: str, value: object, expect: frozenset[int] = REFUSED) -> Damage:
    """One config.json field set to `value`. An absurd size goes to a real process under a memory limit:
    a model built from it before any check could fill the memory of the test process."""
    name = f"config-{key.replace('_', '-')}-{_label(value)}"
    absurd = isinstance(value, int) and not isinstance(value, bool) and value >= 10**7
    return Damage(name, _config(tamper.setter((key,), value)), expect, subprocess=absurd)


def _label(value: object) -> str:
    if isinstance(value, Raw):
        return {"NaN": "nan", "Infinity": "inf"}.get(str(value), "raw")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and abs(value) >= 1000:
        return f"1e{len(str(abs(value))) - 1}" if value > 0 else f"-1e{len(str(abs(value))) - 1}"
    return (
        str(value).replace(".", "p").replace("-", "neg")[:12]
        if not isinstance(value, (dict, list))
        else type(value).__name__
    )


def _weights(edit: Callable[[Path], None]) -> Edit:
    return lambda folder, fx: edit(folder / WEIGHTS)


def _header(edit: Callable[[dict, bytes], tuple[dict | bytes, bytes]]) -> Edit:
    return _weights(tamper.edit_safetensors(edit))


def _claimed(length: Callable[[int], int]) -> Edit:
    """The 8-byte header length prefix lies (the file is otherwise intact)."""

    def edit(path: Path) -> None:
        header, data = tamper.read_safetensors(path)
        body = tamper.dumps(header).encode()
        tamper.write_safetensors(path, body, data, claimed_length=length(len(body) + len(data)))

    return _weights(edit)


def _drop_first(header: dict, data: bytes) -> tuple[dict, bytes]:
    del header[tamper.first_tensor(header)]
    return header, data


def _extra_tensor(header: dict, data: bytes) -> tuple[dict, bytes]:
    header["model.layers.7.mlp.up_proj.weight"] = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    return header, data


def _overlap(header: dict, data: bytes) -> tuple[dict, bytes]:
    """Every tensor of the same size shares the first one's bytes."""
    first = header[tamper.first_tensor(header)]
    for name, info in header.items():
        if name != "__metadata__" and info["shape"] == first["shape"]:
            info["data_offsets"] = first["data_offsets"]
    return header, data


def _index(weight_map: object) -> Edit:
    def edit(folder: Path, fx: Fixtures) -> None:
        header, _ = tamper.read_safetensors(folder / WEIGHTS)
        names = [k for k in header if k != "__metadata__"]
        mapped = {n: weight_map(fx) if callable(weight_map) else weight_map for n in names}
        tamper.write_json(folder / INDEX, {"metadata": {}, "weight_map": mapped})

    return edit


def _sharded_to(name: Callable[[Fixtures], str]) -> Edit:
    """The weights under another file name, and an index naming `name` for one tensor."""

    def edit(folder: Path, fx: Fixtures) -> None:
        header, _ = tamper.read_safetensors(folder / WEIGHTS)
        names = [k for k in header if k != "__metadata__"]
        (folder / WEIGHTS).rename(folder / "model-00001-of-00001.safetensors")
        mapped = {n: "model-00001-of-00001.safetensors" for n in names} | {names[0]: name(fx)}
        tamper.write_json(folder / INDEX, {"metadata": {}, "weight_map": mapped})

    return edit


CONFIG_DAMAGES: list[Damage] = [
    *(_field("num_hidden_layers", v) for v in (10**9, -1, 0, "x", None, 1.5, Raw("1e9"), 1, 3)),
    *(_field("hidden_size", v) for v in (10**7, 0, -64, 63, 128, Raw("NaN"))),
    _field("hidden_size", "64", OK_OR_REFUSED),  # may be read as 64, as a --model.overrides value is
    *(_field("vocab_size", v) for v in (10**13, 0, 100, 4096, 2048.5, Raw("NaN"), -1)),
    *(_field("num_attention_heads", v) for v in (0, 3, -4, None)),
    *(_field("num_key_value_heads", v) for v in (3, 0, "two")),
    _field("head_dim", 7, OK_OR_REFUSED),
    *(_field("intermediate_size", v) for v in (-1, 100, 10**12)),
    _field("max_position_embeddings", 10**12),
    *(_field("max_position_embeddings", v, OK_OR_REFUSED) for v in (-1, 0)),  # lockstep sets its own length
    *(_field("rope_theta", v) for v in ("x", Raw("NaN"), 0, Raw("-Infinity"))),
    _field("rope_scaling", "x"),
    _field("rope_scaling", [1, 2]),
    Damage(
        "config-rope-scaling-llama3-missing-keys", _config(tamper.setter(("rope_scaling",), {"rope_type": "llama3"}))
    ),
    Damage(
        "config-rope-scaling-llama3-strings",
        _config(
            tamper.setter(
                ("rope_scaling",),
                {
                    "rope_type": "llama3",
                    "factor": "x",
                    "low_freq_factor": None,
                    "high_freq_factor": [],
                    "original_max_position_embeddings": -1,
                },
            )
        ),
    ),  # fmt: skip
    *(_field("rms_norm_eps", v) for v in ("x", -1.0, Raw("NaN"))),
    *(_field("model_type", v) for v in ("gpt5", 5, None, Raw(LONE_SURROGATE))),
    _field("tie_word_embeddings", "yes", OK_OR_REFUSED),
    _field("tie_word_embeddings", True, OK_OR_REFUSED),
    _field("num_nextn_predict_layers", 10**9, OK_OR_REFUSED),
    *(
        Damage(f"config-missing-{k.replace('_', '-')}", _config(tamper.dropper((k,))))
        for k in (
            "hidden_size",
            "vocab_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "model_type",
        )
    ),
    Damage("config-top-list", _config(tamper.text("[]"))),
    Damage("config-top-null", _config(tamper.text("null"))),
    Damage("config-top-string", _config(tamper.text('"llama"'))),
    Damage("config-deep-list", _config(tamper.text(DEEP_LIST))),
    Damage("config-deep-object", _config(tamper.text(DEEP_OBJECT))),
    Damage("config-deep-value", _config(tamper.setter(("rope_scaling",), Raw(DEEP_LIST)))),
    Damage("config-not-utf8", _config(tamper.text(b'{"model_type": "\xff"}'))),
    Damage("config-utf8-bom", _config(lambda p: p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes()))),
    Damage("config-surrogate-bytes", _config(tamper.text(b'{"model_type": "\xed\xa0\x80"}'))),
    Damage("config-truncated", _config(tamper.truncate(0.5))),
    Damage("config-empty", _config(tamper.text(b""))),
    Damage("config-folder", _config(tamper.folder_instead)),
    Damage("config-link-sentinel", lambda folder, fx: tamper.link_to(fx.sentinel)(folder / CONFIG)),
    Damage("config-fifo", _config(tamper.fifo), subprocess=True),
    Damage("config-link-dev-zero", _config(tamper.link_to("/dev/zero")), subprocess=True),
]

WEIGHT_DAMAGES: list[Damage] = [
    Damage("safetensors-header-length-2e60", _claimed(lambda n: 2**60)),
    Damage("safetensors-header-length-past-end", _claimed(lambda n: n + 100)),
    Damage("safetensors-header-length-zero", _claimed(lambda n: 0)),
    Damage("safetensors-header-not-json", _header(lambda h, d: (b"not json at all", d))),
    Damage("safetensors-header-list", _header(lambda h, d: (b"[1, 2, 3]", d))),
    Damage("safetensors-header-deep", _header(lambda h, d: (DEEP_LIST.encode(), d))),
    Damage("safetensors-header-not-utf8", _header(lambda h, d: (b'{"\xff": 1}', d))),
    Damage("safetensors-header-surrogate-name", _header(lambda h, d: ({Raw(LONE_SURROGATE): 1, **h}, d))),
    Damage("safetensors-offsets-past-end", _weights(tamper.tensor_setter("data_offsets", [0, 10**12]))),
    Damage("safetensors-offsets-reversed", _weights(tamper.tensor_setter("data_offsets", [4096, 0]))),
    Damage("safetensors-offsets-negative", _weights(tamper.tensor_setter("data_offsets", [-8, 8]))),
    Damage("safetensors-offsets-string", _weights(tamper.tensor_setter("data_offsets", "0-8"))),
    Damage("safetensors-offsets-overlap", _header(_overlap), OK_OR_REFUSED),
    Damage("safetensors-shape-wrong", _weights(tamper.tensor_setter("shape", [3, 3]))),
    Damage("safetensors-shape-negative", _weights(tamper.tensor_setter("shape", [-1, 64]))),
    Damage("safetensors-shape-huge", _weights(tamper.tensor_setter("shape", [10**12, 10**12])), subprocess=True),
    Damage("safetensors-shape-string", _weights(tamper.tensor_setter("shape", "64x64"))),
    Damage("safetensors-dtype-unknown", _weights(tamper.tensor_setter("dtype", "Q9"))),
    Damage("safetensors-dtype-f16", _weights(tamper.tensor_setter("dtype", "F16"))),
    Damage("safetensors-dtype-i64", _weights(tamper.tensor_setter("dtype", "I64"))),
    Damage("safetensors-metadata-int", _header(lambda h, d: ({**h, "__metadata__": 5}, d))),
    Damage("safetensors-tensor-missing", _header(_drop_first)),
    Damage("safetensors-tensor-extra-layer", _header(_extra_tensor)),
    Damage("safetensors-truncated", _weights(tamper.truncate(0.5))),
    Damage("safetensors-only-prefix", _weights(tamper.truncate(0.0))),
    Damage("safetensors-link-sentinel", lambda folder, fx: tamper.link_to(fx.sentinel)(folder / WEIGHTS)),
    Damage("safetensors-folder", _weights(tamper.folder_instead)),
    Damage("safetensors-fifo", _weights(tamper.fifo), subprocess=True),
    Damage("index-garbage", lambda folder, fx: (folder / INDEX).write_text("{not json"), OK_OR_REFUSED),
    Damage("index-deep", lambda folder, fx: (folder / INDEX).write_text(DEEP_LIST), OK_OR_REFUSED),
    Damage("index-to-missing-file", _index("model-00009-of-00009.safetensors"), OK_OR_REFUSED),
    Damage("index-shard-dotdot", _sharded_to(lambda fx: "../../etc/hostname"), OK_OR_REFUSED),
    Damage("index-shard-absolute-sentinel", _sharded_to(lambda fx: str(fx.sentinel)), OK_OR_REFUSED),
    Damage("index-shard-relative-sentinel", _sharded_to(lambda fx: os.path.relpath(fx.sentinel, fx.hf)), OK_OR_REFUSED),
]


def _eval(folder: Path) -> list[str]:
    return [
        "eval", folder, "--config", "llama3_debug", "--model.flavor", "from_hf", "--training.seq_len", "32",
        "--training.local_batch_size", "2", "--training.device", "cpu", "--validation.steps", "1",
    ]  # fmt: skip


def _train(work: Path, folder: Path, *flavor: str) -> list[str]:
    return [
        "train", "--config", "llama3_debug", *tiny_overrides(work), *flavor,
        "--checkpoint.initial_load_path", folder, "--training.steps", "1",
    ]  # fmt: skip


COMMANDS: list[tuple[str, Callable[[Path, Path], list[str]], bool]] = [
    ("from-hf", lambda work, folder: ["convert", "from-hf", folder, work / "imported"], True),
    ("generate", lambda work, folder: ["generate", folder, "--prompt", "hi", "--max-new-tokens", "2"], True),
    ("eval", lambda work, folder: _eval(folder), False),
    ("train-from-hf", lambda work, folder: _train(work, folder, "--model.flavor", "from_hf"), True),
    ("train-initial-load", lambda work, folder: _train(work, folder), False),
]
"""(name, (work, damaged folder) -> argv, in the fast subset)."""


def _builder(damage: Damage, argv: Callable[[Path, Path], list[str]]) -> Callable[[Path, Fixtures], list[str]]:
    def build(work: Path, fx: Fixtures) -> list[str]:
        folder = tamper.copy_tree(fx.hf, work / "hf")
        damage.edit(folder, fx)
        return argv(work, folder)

    return build


def cases() -> list[Case]:
    found = []
    for damage in CONFIG_DAMAGES + WEIGHT_DAMAGES:
        for name, argv, fast in COMMANDS:
            found.append(
                Case(
                    id=f"hf-{damage.name}-{name}",
                    group="hf",
                    build=_builder(damage, argv),
                    expect=damage.expect,
                    fast=fast and not damage.subprocess,
                    subprocess=damage.subprocess,
                    timeout_s=SUBPROCESS_TIMEOUT_S if damage.subprocess else 60.0,
                )
            )
    return found
