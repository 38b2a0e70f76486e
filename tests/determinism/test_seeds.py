"""Every random stream derives from one root seed: the same root gives the same streams, named streams
and pipeline ranks get their own, and the deterministic flags are applied as the docstrings say."""

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lockstep.config.sections import DebugConfig
from lockstep.determinism.seeds import (
    configure_determinism,
    derived_seed,
    resolve_root_seed,
    seed_everything,
    torch_seed,
)


def _draws() -> tuple[list[float], float, float]:
    """One draw from each stream seed_everything seeds: torch, Python, NumPy."""
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


class FakeMesh:
    """What seed_everything reads of a mesh: the pipeline axis's size and the device type."""

    def __init__(self, pp: int) -> None:
        self.device_type = "cpu"
        self._pp = pp

    def __getitem__(self, axis):
        assert axis == "pp"
        return SimpleNamespace(size=lambda: self._pp)


def test_a_derived_seed_is_fixed_by_root_and_stream_and_fits_63_bits():
    seeds = {(root, stream): derived_seed(root, stream) for root in (0, 1, 2**62) for stream in ("torch", "data")}
    assert all(derived_seed(root, stream) == seed for (root, stream), seed in seeds.items())  # repeatable
    assert len(set(seeds.values())) == len(seeds)  # every (root, stream) pair its own
    assert all(0 <= seed < 2**63 for seed in seeds.values())


def test_torch_seeds_differ_per_pipeline_rank_and_rank_0_is_the_torch_stream():
    by_rank = [torch_seed(7, rank) for rank in range(4)]
    assert len(set(by_rank)) == 4
    assert by_rank[0] == derived_seed(7, "torch")
    assert by_rank == [torch_seed(7, rank) for rank in range(4)]


def test_the_same_root_seed_repeats_every_stream_and_another_root_does_not():
    seed_everything(11)
    first = _draws()
    torch.rand(100), random.random(), np.random.rand()  # move every stream on
    seed_everything(11)
    assert _draws() == first
    seed_everything(12)
    assert all(a != b for a, b in zip(_draws(), first, strict=True))


def test_pipeline_ranks_draw_different_torch_numbers_but_share_the_other_streams():
    """Stages hold different layers (torch differs); Python, NumPy and the data order are the run's."""
    mesh = FakeMesh(pp=2)
    seeds = [seed_everything(5, rank, mesh) for rank in (0, 1)]
    draws = []
    for rank in (0, 1):
        seed_everything(5, rank, mesh)
        draws.append(_draws())
    assert draws[0][0] != draws[1][0] and draws[0][1:] == draws[1][1:]
    assert seeds[0]["python"] == seeds[1]["python"] and seeds[0]["data"] == seeds[1]["data"]


def test_the_record_lists_every_pipeline_ranks_seed_and_each_rank_uses_its_own():
    """env.json is written by one rank: its list must hold the seed each stage actually used."""
    mesh = FakeMesh(pp=3)
    records = [seed_everything(9, rank, mesh) for rank in range(3)]
    assert all(r["torch_by_pipeline_rank"] == records[0]["torch_by_pipeline_rank"] for r in records)
    assert [r["torch"] for r in records] == records[0]["torch_by_pipeline_rank"]
    assert all(r["root"] == 9 and "dtensor" not in r for r in records)  # a CPU mesh has no DTensor RNG to seed


def test_a_configured_seed_is_kept_and_an_absent_one_is_drawn_fresh():
    assert resolve_root_seed(DebugConfig(seed=0)) == 0
    drawn = [resolve_root_seed(DebugConfig(seed=None)) for _ in range(3)]
    assert all(0 <= seed < 2**63 for seed in drawn)
    assert len(set(drawn)) == 3  # drawn, not a fixed default (a collision has odds of about 2**-62)


@pytest.fixture
def restored_flags(monkeypatch):
    """configure_determinism changes process-wide state: put it back after the test."""
    for name in ("CUBLAS_WORKSPACE_CONFIG", "NCCL_ALGO"):
        monkeypatch.delenv(name, raising=False)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.utils.deterministic.fill_uninitialized_memory,
        torch.backends.cuda.cudnn_sdp_enabled(),
        torch.is_anomaly_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    torch.utils.deterministic.fill_uninitialized_memory = saved[4]
    torch.backends.cuda.enable_cudnn_sdp(saved[5])
    torch.autograd.set_detect_anomaly(saved[6])


def test_deterministic_mode_sets_the_flags_and_keeps_a_users_environment(restored_flags, monkeypatch):
    monkeypatch.setenv("NCCL_ALGO", "Tree")  # the user's choice is not overridden
    configure_determinism(DebugConfig(deterministic=True, deterministic_warn_only=True, detect_anomaly=True))
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.is_anomaly_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and os.environ["NCCL_ALGO"] == "Tree"


def test_without_deterministic_mode_nothing_is_forced(restored_flags):
    torch.use_deterministic_algorithms(False)
    configure_determinism(DebugConfig(deterministic=False))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.is_anomaly_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and "NCCL_ALGO" not in os.environ
