"""No function outside the trainer (and its runtime), the CLI and the config package takes the whole job config (and the
estimate, which plays the trainer's composition of the whole job for one rank)."""

import ast
from pathlib import Path

import lockstep

PACKAGE = Path(lockstep.__file__).parent
ALLOWED = {PACKAGE / "train" / "trainer.py", PACKAGE / "train" / "runtime.py"}
ALLOWED_FOLDERS = {PACKAGE / "tools" / "estimate"}


def _leaks(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in node.args.args + node.args.kwonlyargs:
                annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                if arg.arg == "job_config" or "JobConfig" in annotation:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}({arg.arg})")
    return found


def test_only_trainer_and_cli_take_the_whole_config():
    leaks = []
    for path in PACKAGE.rglob("*.py"):
        if path in ALLOWED or path.parent in ALLOWED_FOLDERS or path.parent.name in ("config", "cli"):
            continue
        leaks += _leaks(path)
    assert leaks == [], f"functions taking the whole job config: {leaks}"


def test_the_scan_detects_a_leak(tmp_path):
    leaky = tmp_path / "leaky.py"
    leaky.write_text("def build(job_config: 'JobConfig'):\n    pass\n")
    original = PACKAGE
    try:
        globals()["PACKAGE"] = tmp_path
        assert _leaks(leaky) == ["leaky.py:1 build(job_config)"]
    finally:
        globals()["PACKAGE"] = original
