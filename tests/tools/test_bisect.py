"""lockstep bisect names the module that makes two runs differ, across layouts, or the optimizer."""

import os
import sys

import pytest

from lockstep.tools.bisect import bisect
from lockstep.train.trainer import Trainer
from tests.distributed import run_on_ranks
from tests.helpers import tiny_config

RUN = ["--training.global_batch_size", "4", "--debug.deterministic", "--debug.fingerprint",
       "--checkpoint.enable", "--checkpoint.interval", "1"]  # fmt: skip
PERTURBED = ["--job.custom_config_module", "tests.assets.perturb_feed_forward"]


def _train(folder, overrides: list[str]) -> None:
    with Trainer(tiny_config(folder, *RUN, *overrides), show_progress=False) as trainer:
        trainer.train()


@pytest.fixture(autouse=True)
def _importable_test_assets(monkeypatch):
    """Replays run in subprocesses that import tests.assets from the repository root; the perturbing
    module a run's config.toml names is imported there only because the environment trusts it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, *sys.path]))
    monkeypatch.setenv("LOCKSTEP_CONFIG_MODULES", PERTURBED[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    _train(folder, [])
    return folder / "run"


@pytest.mark.parametrize("world_size", [1, 2], ids=["one-process", "fsdp2"])
def test_bisect_finds_the_perturbed_module(tmp_path, reference, world_size):
    """The perturbation starts at step 3; the replay starts from the step-2 checkpoint (FSDP 2 against
    one process: the layouts agree bitwise, so only the perturbation shows)."""
    run_on_ranks(_train, world_size, tmp_path, PERTURBED)  # the plugin only ever loads in spawned ranks
    finding = bisect(reference, tmp_path / "run", tmp_path / "work")
    assert finding.step == 3
    assert (finding.phase, finding.name, finding.module_type) == ("forward", "layers.0.feed_forward", "FeedForward")
    assert "max rel diff" in finding.describe()


def test_bisect_reports_an_optimizer_only_difference(tmp_path, reference):
    _train(tmp_path, ["--optimizer.implementation", "fused"])
    finding = bisect(reference, tmp_path / "run", tmp_path / "work")
    assert finding.step == 1
    assert finding.phase == "parameters"
    assert "optimizer update differs" in finding.describe()
