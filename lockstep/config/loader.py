"""Read a TOML config, apply ``--section.key value`` overrides, type-check, and write it back.

Hand-written rather than tyro/argparse because three behaviours matter more than a generic CLI:
TOML and CLI values go through the same typed coercion; every unknown section or key is refused
with a did-you-mean over the full ``section.key`` names; and sections added at run time by
``job.custom_config_module`` are first-class.

Importing a module runs its code, so a config file never imports one by itself: a module it names is
imported only when the command line names it too (``--job.custom_config_module NAME``) or the
environment lists it in ``LOCKSTEP_CONFIG_MODULES`` (comma-separated; for tools that re-run a recorded
config, such as replay and bisect). A config.toml from elsewhere thus runs nothing it names.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from lockstep.config.errors import ConfigError
from lockstep.config.job import SECTION_TYPES, JobConfig
from lockstep.errors import InputError
from lockstep.untrusted import parse_json

PRESET_PACKAGE = "lockstep.config.presets"
TRUSTED_MODULES_ENV = "LOCKSTEP_CONFIG_MODULES"
"""Modules a config file may import (comma-separated), besides the one named on the command line."""
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_TOML_POSITION = re.compile(r"(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)", re.DOTALL)


FLOAT32_MAX = 3.4028234663852886e38


def preset_names() -> list[str]:
    """Configs shipped inside the package, usable as ``--config NAME``."""
    folder = resources.files(PRESET_PACKAGE)
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def read_toml(name_or_path: str) -> dict[str, Any]:
    """A shipped preset by name, or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError("--config", f"no such file: {name_or_path}")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise InputError(path, f"cannot read the config ({e.strerror})", "check its permissions") from e
        return parse_toml(raw, path)
    if name_or_path not in preset_names():
        raise ConfigError("--config", f"unknown config {name_or_path!r}{_did_you_mean(name_or_path, preset_names())}")
    raw = resources.files(PRESET_PACKAGE).joinpath(f"{name_or_path}.toml").read_bytes()
    return parse_toml(raw, name_or_path)


def parse_toml(raw: bytes, path: str | Path) -> dict[str, Any]:
    """TOML bytes as a dict; an undecodable or malformed file raises InputError at its line and column
    (tomllib only puts the position inside its message, so it is moved to where an editor finds it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            path, f"is not UTF-8 (byte 0x{raw[e.start]:02x})", "save the file as UTF-8", where=str(line)
        ) from e
    try:
        return tomllib.loads(text)
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise InputError(path, "nests arrays or tables deeper than Python can read", "fix the TOML") from None
    except tomllib.TOMLDecodeError as e:
        message, where = str(e), ""
        if match := _TOML_POSITION.fullmatch(message):
            message, where = match["message"], f"{match['line']}:{match['column']}"
        raise InputError(path, f"invalid TOML: {message}", "fix the TOML syntax there", where=where) from e


def _did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """``--a.b v``, ``--a.b=v``, ``--a.flag``, ``--a.no-flag`` -> [("a.b", "v"), ("a.flag", True), ...].

    Values stay strings (or True/False for bare flags); coercion happens against the field type.
    A ``no-`` prefix is resolved later, when the field is known to be a boolean.
    """
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(arg, "expected --section.key value (e.g. --training.steps 10)")
        key, sep, value = arg[2:].partition("=")
        section, _, name = key.partition(".")
        key = f"{section.replace('-', '_')}.{name.replace('-', '_')}"
        if sep:
            overrides.append((key, value))
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides.append((key, argv[i + 1]))
            i += 1
        else:
            overrides.append((key, True))
        i += 1
    return overrides


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a TOML value or CLI string to the field's type, or raise ConfigError naming key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, key)
    if origin in (tuple, list):
        items = _split_list(value, key) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(key, f"expected a list; got {_shown(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(key, f"expected {len(args)} values; got {_shown(value)}")
            return tuple(coerce(v, a, key) for v, a in zip(items, args, strict=True))
        item_type = args[0] if args else str
        coerced = [coerce(v.strip() if isinstance(v, str) else v, item_type, key) for v in items if v != ""]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict:  # a free-form table (model.overrides): its owner checks the entries
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table of keys and values; got {_shown(value)}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(key, f"expected true or false; got {_shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer; got {_shown(value)}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 2**1023 else math.inf
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # no setting means anything at inf or nan
                raise ConfigError(key, f"expected a finite number; got {_shown(value)}")
            if abs(number) > FLOAT32_MAX:  # tensors and optimizers hold settings as float32
                raise ConfigError(key, f"{_shown(value)} is beyond a float32 ({FLOAT32_MAX:.3g}); no setting needs it")
            return number
        raise ConfigError(key, f"expected a number; got {_shown(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string; got {_shown(value)}")
    raise ConfigError(key, f"unsupported field type {hint}")


def _toml_value(value: Any) -> Any:
    """A CLI string read as the TOML value it spells (128, 1e6, true, [1, 2]), else kept as a string: a
    table entry has no field type to coerce it to here, and config.toml should record it typed."""
    if not isinstance(value, str):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return value


def _split_list(value: str, key: str) -> list[Any]:
    """A CLI list: ``a,b`` or, as people copy it from TOML or JSON, ``[a, b]`` / ``["a", 'b']``."""
    text = value.strip()
    if not text.startswith("["):
        return value.split(",")
    try:
        return parse_json(text)
    except ValueError:
        pass
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        pass
    if not text.endswith("]"):
        raise ConfigError(key, f"{_shown(value)} opens a list but does not close it; write it as a,b or [a, b]")
    return text[1:-1].split(",")  # unquoted words, [model, loss]


def _field_hints(section_type: type) -> dict[str, Any]:
    return typing.get_type_hints(section_type)


def _module_to_import(config: str | None, data: dict, parsed: list[tuple[str, Any]]) -> str:
    """job.custom_config_module as the command line gives it, else the config file's if it is trusted
    (``TRUSTED_MODULES_ENV``); a file's untrusted module is refused before anything is imported."""
    given = [value for key, value in parsed if key == "job.custom_config_module"]
    job = data.get("job")
    in_file = job.get("custom_config_module", "") if isinstance(job, dict) else ""
    named = given[-1] if given else in_file
    if not isinstance(named, str):
        raise ConfigError("job.custom_config_module", f"must be a module name, not {named!r}")
    if given:
        return named
    trusted = {m.strip() for m in os.environ.get(TRUSTED_MODULES_ENV, "").split(",") if m.strip()}
    if named and named not in trusted:
        raise ConfigError(
            "job.custom_config_module",
            f"{config} names module {named!r}, and a config file never imports code by itself; to run it, pass "
            f"--job.custom_config_module {named} (or list it in ${TRUSTED_MODULES_ENV})",
        )
    return named


def _custom_sections(module_name: str) -> dict[str, type]:
    """Sections contributed by a user module: a ``CONFIG_SECTIONS = {"name": Dataclass}`` dict."""
    if not module_name:
        return {}
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise ConfigError(
            "job.custom_config_module", f"{module_name!r} is not a module name (dotted identifiers, as import takes)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError("job.custom_config_module", f"cannot import {module_name!r}: {e}") from e
    sections = getattr(module, "CONFIG_SECTIONS", None)
    if not isinstance(sections, dict) or not all(dataclasses.is_dataclass(t) for t in sections.values()):
        raise ConfigError(
            "job.custom_config_module",
            f"{module_name} must define CONFIG_SECTIONS = {{'section_name': SomeDataclass, ...}}",
        )
    clashes = set(sections) & set(SECTION_TYPES)
    if clashes:
        raise ConfigError("job.custom_config_module", f"section names {sorted(clashes)} are built in; rename them")
    return sections


class _Builder:
    """Collects values per section, checking every key against the known fields."""

    def __init__(self, section_types: dict[str, type]) -> None:
        self.section_types = section_types
        self.values: dict[str, dict[str, Any]] = {name: {} for name in section_types}
        self.all_keys = [f"{s}.{f.name}" for s, t in section_types.items() for f in dataclasses.fields(t)]

    def _unknown(self, key: str, what: str) -> ConfigError:
        candidates = self.all_keys if "." in key else list(self.section_types)
        return ConfigError(key, f"unknown {what}{_did_you_mean(key, candidates)}")

    def set(self, key: str, value: Any) -> None:
        section, _, name = key.partition(".")
        if section not in self.section_types:
            raise self._unknown(key, "config section")
        hints = _field_hints(self.section_types[section])
        table, _, entry = name.partition(".")
        if entry and typing.get_origin(hints.get(table)) is dict:  # --model.overrides.dim 128
            self.values[section].setdefault(table, {})[entry] = _toml_value(value)
            return
        if name not in hints and name.startswith("no_") and hints.get(name[3:]) is bool and value is True:
            name, value = name[3:], False
        if name not in hints:
            raise self._unknown(f"{section}.{name}", "config key")
        coerced = coerce(value, hints[name], f"{section}.{name}")
        if isinstance(coerced, dict):  # a table merges with entries given before (TOML, then the CLI)
            coerced = self.values[section].get(name, {}) | coerced
        self.values[section][name] = coerced

    def set_toml(self, data: dict[str, Any]) -> None:
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(section, "top-level TOML entries must be [section] tables")
            if section not in self.section_types:
                raise self._unknown(section, "config section")
            for name, value in table.items():
                self.set(f"{section}.{name}", value)

    def build(self) -> JobConfig:
        built = {name: t(**self.values[name]) for name, t in self.section_types.items()}
        builtin = {name: built.pop(name) for name in SECTION_TYPES}
        return JobConfig(**builtin, custom=built)


def load_config(config: str | None, overrides: list[str]) -> JobConfig:
    """The typed job config from a preset name or TOML path plus CLI overrides (not yet validated)."""
    data = read_toml(config) if config else {}
    parsed = parse_overrides(overrides)
    builder = _Builder({**SECTION_TYPES, **_custom_sections(_module_to_import(config, data, parsed))})
    builder.set_toml(data)
    for key, value in parsed:
        builder.set(key, value)
    return builder.build()


def _toml_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_ready(v) for v in value]
    return value


def config_to_dict(config: JobConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict of every section (custom ones included), as written to config.toml."""
    return {name: dataclasses.asdict(section) for name, section in config.sections().items()}


def dump_toml(config: JobConfig) -> str:
    """The fully resolved config; ``--config`` on this text reproduces the run. None values are left
    out (TOML has no null), which restores the same defaults."""
    return tomli_w.dumps(_toml_ready(config_to_dict(config)))


def _shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut to a readable length (an option can be 200 kB)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
