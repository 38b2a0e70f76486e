"""A few refusals seen as a user sees them: a real ``lockstep`` process (its own streams, warnings
filters and exit code), in the fast subset, so that what the in-process runs stand in for is checked
each time too."""

from __future__ import annotations

from pathlib import Path

from tests.hostile import tamper
from tests.hostile.fixtures import Fixtures
from tests.hostile.harness import Case


def _damaged_step(work: Path, fx: Fixtures) -> list[str]:
    """The newest step folder itself, its manifest cut in half: nothing to fall back to."""
    run = tamper.copy_tree(fx.run, work / "run")
    step = sorted((run / "checkpoint").glob("step-*"))[-1]
    tamper.truncate(0.5)(step / "lockstep.json")
    return ["generate", step, "--prompt", "hi", "--max-new-tokens", "2"]


def _config_not_an_object(work: Path, fx: Fixtures) -> list[str]:
    folder = tamper.copy_tree(fx.hf, work / "hf")
    (folder / "config.json").write_text("[1, 2, 3]")
    return ["convert", "from-hf", folder, work / "imported"]


def cases() -> list[Case]:
    return [
        Case(id="user-damaged-step-generate", group="user", build=_damaged_step, subprocess=True),
        Case(id="user-hf-config-list-from-hf", group="user", build=_config_not_an_object, subprocess=True),
    ]
