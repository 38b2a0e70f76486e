"""The import rules of docs/architecture.md, checked on the source (nothing is imported):

- imports point down the layers, never up, and never sideways between the packages of one layer;
- no import cycles between modules (function-local imports count: one may not hide a cycle);
- function-local imports only in the CLI (each command imports its module when it runs, so
  `lockstep --help` and the light commands start without torch) or of optional heavy packages;
- no private name (``_x``) imported from another module.

A new violation fails here with the file, the line and the rule."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    ["lockstep.errors", "lockstep.lifetime", "lockstep.untrusted", "lockstep.wall_clock"],
    ["lockstep.config"],
    ["lockstep.determinism"],
    ["lockstep.data", "lockstep.models"],
    ["lockstep.parallel"],
    ["lockstep.checkpoint"],
    ["lockstep.run"],
    ["lockstep.train"],
    ["lockstep.generate"],
    ["lockstep.tools"],
    ["lockstep.cli"],
    ["lockstep.__main__"],
]
"""Lowest first. The base layer's modules may import each other (errors is the leaf of them)."""

OPTIONAL_HEAVY = (
    "matplotlib", "wandb", "torch.utils.tensorboard", "tensorboard", "datasets", "pyarrow", "torch._inductor",
    "pydoc_data",
)  # fmt: skip
"""Imported where used: optional extras (plots, wandb, TensorBoard writing and reading), the parquet and
Hugging Face readers, torch's compiler config, and the standard library's 1 MB of help topics (the
built-in corpus)."""


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> tuple[int, str]:
    if module.endswith(".__main__"):  # `python -m lockstep.x`: an entry point, above everything
        return len(LAYERS) - 1, "lockstep.__main__"
    for layer, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                return layer, package
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add its package to LAYERS")


def _imports():
    """(module, line, imported module, names, function-local) for every lockstep source file."""
    found = []
    for path in sorted((ROOT / "lockstep").rglob("*.py")):
        module = _module(path)
        tree = ast.parse(path.read_text())
        local = {
            id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                targets = [(node.module, [a.name for a in node.names])]
                # `from lockstep.x import y` may name a submodule y
                targets += [
                    (f"{node.module}.{a.name}", [])
                    for a in node.names
                    if (ROOT / (node.module + "." + a.name).replace(".", "/")).with_suffix(".py").is_file()
                ]
            elif isinstance(node, ast.Import):
                targets = [(a.name, []) for a in node.names]
            else:
                continue
            for target, names in targets:
                found.append((module, f"{path.relative_to(ROOT)}:{node.lineno}", target, names, id(node) in local))
    return found


IMPORTS = _imports()
OURS = [i for i in IMPORTS if i[2].startswith("lockstep")]


def test_imports_point_down_the_layers():
    wrong = []
    for module, where, target, _, _ in OURS:
        (mine, my_package), (theirs, their_package) = _package(module), _package(target)
        if theirs > mine or (theirs == mine and my_package != their_package and mine > 0):
            wrong.append(
                f"{where}: {module} (layer {mine}, {my_package}) imports {target} (layer {theirs}, {their_package})"
            )
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules = {_module(p) for p in (ROOT / "lockstep").rglob("*.py")}
    edges = {m: set() for m in modules}
    for module, _, target, _, _ in OURS:
        if target in modules and target != module:
            edges[module].add(target)
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_local_imports_only_in_the_cli_or_of_optional_heavy_packages():
    wrong = [
        f"{where}: imports {target} inside a function"
        for module, where, target, _, local in IMPORTS
        if local and not module.startswith("lockstep.cli") and not target.startswith(OPTIONAL_HEAVY)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_private_name_is_imported_from_another_module():
    wrong = [
        f"{where}: {module} imports {', '.join(n for n in names if n.startswith('_'))} from {target}"
        for module, where, target, names, _ in OURS
        if any(n.startswith("_") and n != "__version__" for n in names)
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "source, rule",
    [
        ("from lockstep.train.trainer import Trainer\n", test_imports_point_down_the_layers),
        ("def f():\n    from lockstep.config import load_config\n", test_function_local_imports_only_in_the_cli_or_of_optional_heavy_packages),
        ("from lockstep.config.loader import _builder\n", test_no_private_name_is_imported_from_another_module),
    ],
)  # fmt: skip
def test_each_rule_catches_a_violation(monkeypatch, source, rule, tmp_path):
    """A module of the data layer that breaks the rule makes the rule's test fail."""
    planted = ROOT / "lockstep" / "data" / "_planted_for_test_layers.py"
    monkeypatch.setattr(
        f"{__name__}.IMPORTS",
        IMPORTS + [(_module(planted), "planted:1", t, n, loc) for _, _, t, n, loc in _parse(source, planted)],
    )
    monkeypatch.setattr(f"{__name__}.OURS", [i for i in globals()["IMPORTS"] if i[2].startswith("lockstep")])
    with pytest.raises(AssertionError):
        rule()


def test_a_cycle_is_caught(monkeypatch):
    monkeypatch.setattr(f"{__name__}.OURS", OURS + [("lockstep.errors", "planted:1", "lockstep.untrusted", [], False)])
    with pytest.raises(AssertionError, match="lockstep.errors -> lockstep.untrusted"):
        test_no_import_cycles()


def _parse(source: str, path: Path):
    tree = ast.parse(source)
    local = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
    return [
        (None, None, node.module, [a.name for a in node.names], id(node) in local)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    ]
