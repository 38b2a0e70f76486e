"""Generate the config reference (markdown) from the section dataclasses and their field docstrings."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from lockstep.config.job import SECTION_TYPES


def field_docs(section_type: type) -> dict[str, str]:
    """The string literal that follows each field in the class body, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(section_type)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    return "(none)" if value is None else repr(value)


def config_reference() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section, section_type in SECTION_TYPES.items():
        docs = field_docs(section_type)
        hints = {f.name: f.type for f in dataclasses.fields(section_type)}
        for f in dataclasses.fields(section_type):
            kind = str(hints[f.name]).replace("|", "or")
            lines.append(
                f"| `{section}.{f.name}` | {kind} | `{_default(f)}` | {docs.get(f.name, '').replace('|', '/')} |"
            )
    return "\n".join(lines)
