"""Model families by name: how to build each and its flavor table."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lockstep.config.errors import ConfigError
from lockstep.config.loader import coerce  # the loader's own coercion: CLI strings and TOML values alike
from lockstep.config.sections import ModelConfig
from lockstep.errors import InputError
from lockstep.models.deepseek_v3 import DEEPSEEK_V3_FLAVORS, DeepSeekV3, DeepSeekV3Args
from lockstep.models.deepseek_v3 import hf_adapter as deepseek_v3_hf
from lockstep.models.deepseek_v3 import parallel_plan as deepseek_v3_plan
from lockstep.models.llama3 import LLAMA3_FLAVORS, Llama3, Llama3Args
from lockstep.models.llama3 import hf_adapter as llama3_hf
from lockstep.models.llama3 import parallel_plan as llama3_plan
from lockstep.models.llama4 import LLAMA4_FLAVORS, Llama4, Llama4Args
from lockstep.models.llama4 import hf_adapter as llama4_hf
from lockstep.models.llama4 import parallel_plan as llama4_plan
from lockstep.models.qwen3 import QWEN3_FLAVORS, QWEN3_MOE_FLAVORS, Qwen3, Qwen3Args
from lockstep.models.qwen3 import hf_adapter as qwen3_hf
from lockstep.models.qwen3 import parallel_plan as qwen3_plan
from lockstep.models.size import WEIGHT_BYTES_PER_PARAMETER, size_problem
from lockstep.untrusted import parse_json


@dataclass(frozen=True)
class ModelSpec:
    name: str
    flavors: dict[str, Any]
    build: Callable[[Any, str], nn.Module]
    """(args, attention backend) -> model; call it under torch.device("meta"). The backend is sdpa or
    flex: model.attention with auto resolved for the device (attention.resolve_attention_backend)."""
    tensor_parallel_plan: Callable[[nn.Module, bool], dict[str, Any]]
    """(model or pipeline stage, loss_parallel) -> {module name: torch ParallelStyle}."""
    check_tensor_parallel_degree: Callable[[Any, int], str | None]
    """(args, degree) -> why the degree cannot split the model, or None."""
    args_from_dict: Callable[[dict], Any]
    """Rebuilds *Args from the plain dict recorded in a checkpoint manifest."""
    hf_adapter: Any
    """Module with hf_name(name), to_hf(state, args), from_hf(state, args), hf_source(name, shape,
    hf_names, args) (what sharded readers read, see models.common.hf_source), hf_config(args, dtype),
    args_from_hf_config(config)."""
    canonical_tensor_parallel: bool = False
    """Under debug.deterministic its tensor-parallel plan runs with canonical sums (its linear layers
    and head broadcasts; lockstep.parallel.canonical_linear), bitwise for every degree."""
    hf_model_types: tuple[str, ...] = ()
    """The ``model_type`` values of Hugging Face config.json files this family reads."""


def _family(name: str, flavors: dict, model: type, args: type, plan, hf, *model_types: str) -> ModelSpec:
    """A family from its folder's pieces (model class, *Args, parallel_plan and hf_adapter modules)."""
    return ModelSpec(
        name, flavors, lambda a, backend: model(a, backend), plan.tensor_parallel_plan,
        plan.check_tensor_parallel_degree, args.from_dict, hf, canonical_tensor_parallel=True,
        hf_model_types=model_types,
    )  # fmt: skip


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _family("llama3", LLAMA3_FLAVORS, Llama3, Llama3Args, llama3_plan, llama3_hf, "llama"),
        _family(
            "deepseek_v3",
            DEEPSEEK_V3_FLAVORS,
            DeepSeekV3,
            DeepSeekV3Args,
            deepseek_v3_plan,
            deepseek_v3_hf,
            "deepseek_v3",
        ),
        _family("qwen3", QWEN3_FLAVORS, Qwen3, Qwen3Args, qwen3_plan, qwen3_hf, "qwen3"),
        _family("qwen3_moe", QWEN3_MOE_FLAVORS, Qwen3, Qwen3Args, qwen3_plan, qwen3_hf, "qwen3_moe"),
        _family("llama4", LLAMA4_FLAVORS, Llama4, Llama4Args, llama4_plan, llama4_hf, "llama4_text", "llama4"),
    )
}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; choose from {', '.join(options)}"


FROM_HF = "from_hf"
"""The flavor that takes the architecture from checkpoint.initial_load_path's config.json."""
CUSTOM = "custom"
"""The flavor with no table behind it: [model.overrides] gives every number of the family's *Args
(vocab_size and max_seq_len aside: the tokenizer and training.seq_len set them; a family with experts asks
for their numbers too, 0 where there are none), so no size comes silently from a flavor. The dataclass's
other defaults (None, booleans and names: grouped heads, RoPE scaling, tied embeddings, a router's score
function) apply unless given, and the resolved args are printed at start."""


def model_args(model: ModelConfig, vocab_size: int, max_seq_len: int) -> tuple[ModelSpec, Any]:
    """The spec and the flavor's args (or, for flavor from_hf, the recorded config.json's) with
    model.overrides applied, the tokenizer's vocab and the training sequence length. A from_hf model
    keeps its own vocabulary size (embedding rows), which the tokenizer's must not exceed."""
    spec = model_spec(model.name)
    args = _base_args(spec, model)
    if args is None:
        raise ConfigError(
            "model.flavor",
            f"unknown {model.name} flavor {model.flavor!r}{_suggest(model.flavor, [*spec.flavors, FROM_HF, CUSTOM])}",
        )
    if args.vocab_size > 0:  # a published shape (or an HF config) keeps its (padded) vocabulary
        if vocab_size > args.vocab_size:
            raise ConfigError(
                "model.tokenizer",
                f"{vocab_size} tokens do not fit the {args.vocab_size}-row embedding of {model.name} "
                f"{model.flavor}; use the model's own tokenizer (model.tokenizer = hf) or a debug flavor",
            )
        vocab_size = args.vocab_size
    overrides = _overrides(type(args), model.overrides)
    if "vocab_size" in overrides:  # padded rows, as torchtitan pads its debug model's vocabulary
        if overrides["vocab_size"] < vocab_size:
            raise ConfigError(
                "model.overrides.vocab_size",
                f"{overrides['vocab_size']} rows cannot hold the tokenizer's {vocab_size} tokens; give at least that",
            )
        vocab_size = overrides.pop("vocab_size")
    args = dataclasses.replace(args, **overrides, vocab_size=vocab_size, max_seq_len=max_seq_len)
    if model.overrides or model.flavor == FROM_HF:
        key = "model.overrides" if model.overrides else "model.hf_config"
        try:
            _check_shape(args)
            args.validate()
        except (ValueError, ZeroDivisionError) as error:
            raise ConfigError(key, f"{error} (in {model.name} {model.flavor} with its overrides)") from None
    return spec, args


def typed_overrides(model: ModelConfig) -> dict[str, Any]:
    """model.overrides as the args' field types have them (what config.toml and checkpoints record)."""
    spec = model_spec(model.name)
    args = _base_args(spec, model)
    if args is None or not model.overrides:
        return dict(model.overrides)
    return plain(_overrides(type(args), model.overrides))


def _base_args(spec: ModelSpec, model: ModelConfig) -> Any:
    """The args the overrides apply to: the flavor's row, the recorded config.json (from_hf), or the
    dataclass's own defaults (custom, once the overrides give every number); None for an unknown flavor."""
    if model.flavor == FROM_HF:
        return _args_from_hf(spec, model)
    if model.flavor != CUSTOM:
        return spec.flavors.get(model.flavor)
    args_type = type(next(iter(spec.flavors.values())))
    required = [
        f.name for f in dataclasses.fields(args_type)
        if isinstance(f.default, int | float) and not isinstance(f.default, bool)
        and f.name not in ("vocab_size", *NOT_OVERRIDABLE)
    ]  # fmt: skip
    if missing := [name for name in required if name not in model.overrides]:
        raise ConfigError(
            "model.overrides",
            f"flavor custom takes every number of {args_type.__name__} from [model.overrides]; "
            f"missing {', '.join(missing)} (or start from a flavor: {', '.join(spec.flavors)})",
        )
    return args_type()


POSITIVE = ("dim", "n_layers", "n_heads", "norm_eps", "rope_theta", "head_dim", "multiple_of")
"""Fields that no model can have at zero (where a family has them)."""


def _check_shape(args: Any) -> None:
    """What holds for every family's args: numbers finite and not negative, sizes and epsilons positive
    (the family's own validate checks the rest: divisibility, expert counts)."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{f.name} = {value} must be a finite number >= 0")
        if value == 0 and f.name in POSITIVE:
            raise ValueError(f"{f.name} must be > 0")
    if getattr(args, "n_kv_heads", None) == 0:
        raise ValueError("n_kv_heads must be > 0 (or unset: as many as n_heads)")
    if getattr(args, "rope_theta", 2.0) <= 1:
        raise ValueError(f"rope_theta = {args.rope_theta} must be > 1 (the RoPE base)")


def _args_from_hf(spec: ModelSpec, model: ModelConfig) -> Any:
    if not model.hf_config:
        raise ConfigError("model.flavor", "from_hf needs checkpoint.initial_load_path, a Hugging Face folder")
    model_type = model.hf_config.get("model_type")
    if model_type is not None and model_type not in spec.hf_model_types:
        family = next((n for n, m in MODELS.items() if model_type in m.hf_model_types), None)
        fix = f"train with --model.name {family}" if family else "lockstep has no family for it"
        raise ConfigError("model.flavor", f"from_hf: the config.json is a {model_type!r} model, not {spec.name}; {fix}")
    try:
        args = spec.hf_adapter.args_from_hf_config(model.hf_config)
        _check_types(args)
        return args
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ConfigError(
            "model.flavor", f"from_hf: the config.json is not a {spec.name} config ({error} missing or wrong)"
        ) from None


def checked_args(spec: ModelSpec, build: Callable[[], Any], *, where: Any, fix: str) -> Any:
    """*Args read from a file lockstep did not just write (an HF config.json, a checkpoint manifest's
    model.args), checked as strictly as model.overrides before anything is built: every key present,
    every value of its field's type, shapes positive and divisible, and the fp32 weights small enough to
    fit this machine. Otherwise InputError naming `where`, the key and `fix`."""
    try:
        args = build()
        _check_types(args)
        _check_shape(args)
        args.validate()
    except KeyError as error:
        raise InputError(where, f"lacks the key {error}", fix) from None
    except ConfigError as error:
        raise InputError(where, str(error), fix) from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as error:
        raise InputError(where, f"is not a {spec.name} model ({error})", fix) from None
    if problem := size_problem(spec, args, bytes_per_parameter=WEIGHT_BYTES_PER_PARAMETER):
        raise InputError(where, problem, fix)
    return args


def hf_config_args(spec: ModelSpec, config: dict, where: Any) -> Any:
    """The family's *Args of a Hugging Face config.json (read from `where`), through ``checked_args``."""
    return checked_args(
        spec, lambda: spec.hf_adapter.args_from_hf_config(config), where=where,
        fix="give the config.json saved with the model",
    )  # fmt: skip


def _check_types(args: Any, prefix: str = "") -> None:
    """Every field of the args dataclass (nested ones too: RoPE scaling) holds a value of its declared
    type, as JSON gives it: no string for a number, no null where a value is needed (ValueError naming
    the field). Stricter than overrides on the command line, which arrive as text."""
    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        value, hint, name = getattr(args, f.name), hints[f.name], prefix + f.name
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if value is None:
            if type(None) not in allowed:
                raise ValueError(f"{name} is null; it needs a value")
            continue
        if dataclasses.is_dataclass(value):
            _check_types(value, f"{name}.")
            continue
        kinds = tuple(typing.get_origin(a) or a for a in allowed if a is not type(None))
        if float in kinds:
            kinds += (int,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ValueError(f"{name} = {value!r} is not of its type ({hint})")


NOT_OVERRIDABLE = {"max_seq_len": "it is training.seq_len"}


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), or None."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else None


def _overrides(args_type: type, overrides: dict[str, Any], prefix: str = "model.overrides") -> dict[str, Any]:
    """model.overrides checked against the args dataclass: known fields, values of the field's type. A
    field that holds a dataclass (rope_scaling) takes a table of its fields (TOML, or JSON on the command
    line), or "none" to turn it off."""
    hints = typing.get_type_hints(args_type)
    checked = {}
    for name, value in overrides.items():
        key = f"{prefix}.{name}"
        if name not in hints:
            raise ConfigError(key, f"{args_type.__name__} has no field {name!r}{_suggest(name, list(hints))}")
        if name in NOT_OVERRIDABLE:
            raise ConfigError(key, f"cannot be overridden: {NOT_OVERRIDABLE[name]}")
        nested = _dataclass_of(hints[name])
        if nested is not None:
            checked[name] = _nested(nested, value, key, optional=type(None) in typing.get_args(hints[name]))
            continue
        try:
            checked[name] = coerce(value, hints[name], key)
        except ConfigError as error:
            if "unsupported field type" not in str(error):
                raise
            raise ConfigError(key, f"is a {hints[name]}, which the config cannot set; use a flavor") from None
    return checked


def _nested(cls: type, value: Any, key: str, optional: bool) -> Any:
    if isinstance(value, str) and value.strip().lower() == "none" and optional:
        return None
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = parse_json(value.encode())
        except ValueError as error:
            raise ConfigError(key, f"is not a JSON table ({error})") from None
    if not isinstance(value, dict):
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(key, f"takes a table of {cls.__name__}'s fields ({fields}){' or none' if optional else ''}")
    try:
        return cls(**_overrides(cls, value, key))
    except TypeError as error:
        raise ConfigError(key, f"{cls.__name__}: {error}") from None


def plain(overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides as config.toml records them: a dataclass as its table, None as "none"."""
    return {
        k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else "none" if v is None else v
        for k, v in overrides.items()
    }


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError("model.name", f"unknown model {name!r}{_suggest(name, list(MODELS))}")
    return MODELS[name]


def family_of_hf_config(config: dict, where: object = "config.json") -> str:
    """The lockstep model family of a Hugging Face config.json, from its ``model_type``."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    for name, spec in MODELS.items():
        if model_type in spec.hf_model_types:
            return name
    supported = ", ".join(t for spec in MODELS.values() for t in spec.hf_model_types)
    raise InputError(where, f"model_type {model_type!r} is not one lockstep reads (supported: {supported})")
