"""Files lockstep reads back from disk but did not just write (checkpoint and dataset manifests,
preparation plans, Hugging Face config.json, a run folder's records): one bounded parse and, for the
JSON files lockstep depends on, one shape check, so that a damaged or crafted file is one line naming
the file and the key, never a traceback from deep inside whatever used the value.

A shape is built from a few combinators (``Int``, ``Num``, ``Str``, ``Bool``, ``ListOf``, ``MapOf``,
``Obj``, ``Optional``, ``Anything``) and checked before any value is used. The parse itself is bounded:
a size limit read from the file's stat before a byte is read, strict UTF-8, no NaN or Infinity
literals, no lone surrogates (which decode as JSON but cannot be written back as UTF-8), and nesting
deeper than ``MAX_DEPTH`` refused before Python's recursion limit is reached.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from lockstep.errors import InputError

MAX_DEPTH = 64
"""Deepest nesting any file lockstep writes comes far below (a manifest nests four levels)."""

MAX_BYTES = 256 * 2**20
"""Larger than a dataset manifest of a million shards; a file larger than this is not one of ours."""


class ShapeError(ValueError):
    """A value of the wrong shape at `key` (a dotted path); `expected` says what belongs there."""

    def __init__(self, key: str, expected: str, found: object) -> None:
        self.key, self.expected = key, expected
        super().__init__(f"{key or 'the top level'}: expected {expected}, found {_describe(found)}")


_NOTHING = object()
"""What a missing key holds, in a ShapeError."""


def _describe(value: object) -> str:
    if value is _NOTHING:
        return "nothing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value) if len(repr(value)) <= 24 else f"a {len(str(value))}-digit number"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a string of {len(value)} characters"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _range_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    return f" >= {low}" if low is not None else (f" <= {high}" if high is not None else "")


def _child(key: str, name: object) -> str:
    """The dotted path of `name` under `key`. A key read from the file is shown as it is only when it is
    short and printable; else quoted with escapes (or its length), so no key can break the one-line refusal."""
    if isinstance(name, int):
        return f"{key}[{name}]"
    text = name if isinstance(name, str) and name.isprintable() and len(name) <= 40 else _describe(name)
    return f"{key}.{text}" if key else text


class Shape:
    """A check of one JSON value; ``check`` raises ShapeError naming the first key that does not fit."""

    def check(self, value: Any, key: str = "") -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Anything(Shape):
    def check(self, value: Any, key: str = "") -> None:
        return None


@dataclass(frozen=True)
class Int(Shape):
    min: int | None = None
    max: int | None = None

    def check(self, value: Any, key: str = "") -> None:
        bounds = _range_text(self.min, self.max)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ShapeError(key, f"an integer{bounds}", value)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise ShapeError(key, f"an integer{bounds}", value)


@dataclass(frozen=True)
class Num(Shape):
    """A finite number (an integer too)."""

    min: float | None = None

    def check(self, value: Any, key: str = "") -> None:
        expected = "a finite number" + (f" >= {self.min}" if self.min is not None else "")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ShapeError(key, expected, value)
        if self.min is not None and value < self.min:
            raise ShapeError(key, expected, value)


@dataclass(frozen=True)
class Str(Shape):
    pattern: str | None = None
    """A regular expression the whole string must match."""
    choices: tuple[str, ...] = ()

    def check(self, value: Any, key: str = "") -> None:
        if not isinstance(value, str):
            raise ShapeError(key, "a string", value)
        if self.choices and value not in self.choices:
            raise ShapeError(key, f"one of {', '.join(map(repr, self.choices))}", value)
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise ShapeError(key, f"a string matching {self.pattern}", value)


@dataclass(frozen=True)
class Bool(Shape):
    def check(self, value: Any, key: str = "") -> None:
        if not isinstance(value, bool):
            raise ShapeError(key, "true or false", value)


@dataclass(frozen=True)
class Optional(Shape):
    """`shape`, or null."""

    shape: Shape

    def check(self, value: Any, key: str = "") -> None:
        if value is not None:
            self.shape.check(value, key)


@dataclass(frozen=True)
class ListOf(Shape):
    item: Shape = field(default_factory=Anything)

    def check(self, value: Any, key: str = "") -> None:
        if not isinstance(value, list):
            raise ShapeError(key, "a list", value)
        for index, item in enumerate(value):
            self.item.check(item, _child(key, index))


@dataclass(frozen=True)
class MapOf(Shape):
    """An object with any keys (each must fit `name`), every value fitting `value`."""

    value: Shape = field(default_factory=Anything)
    name: Str = field(default_factory=Str)

    def check(self, value: Any, key: str = "") -> None:
        if not isinstance(value, dict):
            raise ShapeError(key, "an object", value)
        for name, item in value.items():
            self.name.check(name, _child(key, name))
            self.value.check(item, _child(key, name))


@dataclass(frozen=True)
class Obj(Shape):
    """An object with these keys (`optional` ones may be absent or null); other keys are allowed, since
    newer writers add keys that older readers need not know."""

    required: Mapping[str, Shape] = field(default_factory=dict)
    optional: Mapping[str, Shape] = field(default_factory=dict)

    def check(self, value: Any, key: str = "") -> None:
        if not isinstance(value, dict):
            raise ShapeError(key, "an object", value)
        for name, shape in self.required.items():
            if name not in value:
                raise ShapeError(_child(key, name), f"a key {name!r}", _NOTHING)
            shape.check(value[name], _child(key, name))
        for name, shape in self.optional.items():
            if value.get(name) is not None:
                shape.check(value[name], _child(key, name))


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _depth_exceeds(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than `limit` (a linear scan: json's own decoder
    recurses and would hit Python's recursion limit on a crafted ``[[[[...``)."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _no_lone_surrogates(value: Any, key: str = "") -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ShapeError(key, "text without lone surrogates (\\ud800-\\udfff escapes)", value) from None
    elif isinstance(value, dict):
        for name, item in value.items():
            _no_lone_surrogates(name, _child(key, "(a key)"))
            _no_lone_surrogates(item, _child(key, name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _no_lone_surrogates(item, _child(key, index))


def parse_json(text: str | bytes, *, max_depth: int = MAX_DEPTH, allow_nan: bool = False) -> Any:
    """The JSON value of `text`, bounded: ValueError for invalid UTF-8 or JSON, NaN or Infinity (unless
    `allow_nan`: metrics records hold them), nesting deeper than `max_depth`, integers of more digits than
    Python converts, and lone surrogates (the message says which)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"is not UTF-8 (byte {text[e.start]:#04x} at offset {e.start})") from None
    if _depth_exceeds(text, max_depth):
        raise ValueError(f"nests deeper than {max_depth} levels")
    try:
        value = json.loads(text) if allow_nan else json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"is not valid JSON ({e})") from None
    _no_lone_surrogates(value)
    return value


def load_toml(text: str | bytes) -> dict:
    """A TOML document read back from a run folder: ValueError for invalid UTF-8 or TOML and for nesting
    deeper than tomllib's recursion can follow."""
    try:
        return tomllib.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except RecursionError:
        raise ValueError("nests arrays or tables deeper than Python can read") from None


def check_shape(path: str | Path, value: Any, shape: Shape, *, fix: str) -> Any:
    """`value` (read from `path`) when it fits `shape`; InputError naming the file, the key and `fix`."""
    try:
        shape.check(value)
    except ShapeError as e:
        raise InputError(path, str(e), fix) from None
    return value


def read_json(path: str | Path, shape: Shape, *, fix: str, max_bytes: int = MAX_BYTES) -> Any:
    """The JSON value in `path`, checked against `shape`: InputError naming the file, the key and `fix`
    for a file that is missing, too large, not UTF-8 or JSON, or of the wrong shape."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InputError(path, "is not a regular file", fix)
        if size > max_bytes:
            raise InputError(path, f"is {size} bytes, more than the {max_bytes} a file of this kind can be", fix)
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(path, f"cannot be read ({e.strerror or e})", fix) from None
    try:
        value = parse_json(raw)
        shape.check(value)
    except ValueError as e:
        raise InputError(path, str(e), fix) from None
    return value


HF_CONFIG_SHAPE = Obj(optional={"model_type": Str(), "num_nextn_predict_layers": Int(min=0, max=64)})
"""What every reader of a Hugging Face config.json relies on before its family's adapter reads the rest
(and ``checked_args`` checks each field the adapter takes)."""


def read_hf_config(folder: str | Path) -> dict:
    """A Hugging Face folder's config.json: an object, bounded and checked (InputError naming the file)."""
    return read_json(
        Path(folder) / "config.json", HF_CONFIG_SHAPE, fix="give the config.json saved with the model", max_bytes=2**24
    )
