"""A few refusals seen as a user sees them: a real ``lockstep`` process (its own streams, warnings
filters and exit code), so that what the in-process runs stand in for (and the warnings they drop) is
checked too: a checksum failing while a checkpoint loads and a non-finite stop go through torch code
that warns."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import tiny_overrides
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


def _flipped_newest_eval(work: Path, fx: Fixtures) -> list[str]:
    """A checksum that fails while the checkpoint loads (torch.distributed.checkpoint's own warnings)."""
    from tests.checkpoint.crafting import flip_byte

    run = tamper.copy_tree(fx.run, work / "run")
    flip_byte(sorted((run / "checkpoint").glob("step-*"))[-1])
    return ["eval", run, "--validation.steps", "1"]


def _diverging(work: Path, fx: Fixtures) -> list[str]:
    """A learning rate that makes step 2 non-finite: the stop goes through backward hooks."""
    return [
        "train",
        "--config",
        "llama3_debug",
        *tiny_overrides(work),
        "--optimizer.lr",
        "1e30",
        "--training.steps",
        "3",
    ]


def cases() -> list[Case]:
    return [
        Case(id="user-damaged-step-generate", group="user", build=_damaged_step, subprocess=True),
        Case(id="user-hf-config-list-from-hf", group="user", build=_config_not_an_object, subprocess=True),
        Case(id="user-checksum-fails-while-loading-eval", group="user", build=_flipped_newest_eval,
             expect=frozenset({0, 2}), subprocess=True),
        Case(id="user-non-finite-stop-train", group="user", build=_diverging, subprocess=True, fast=False),
    ]  # fmt: skip
