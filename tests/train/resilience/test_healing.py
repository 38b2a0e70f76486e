"""Healing: a group's full live state crosses torchft's HTTP transport and a fresh group continues bitwise."""

import os
from datetime import timedelta

import pytest

pytest.importorskip("torchft")

import torch  # noqa: E402
from torch.distributed._serialization import _streaming_save  # noqa: E402

from lockstep.config import load_config  # noqa: E402
from lockstep.errors import LockstepError  # noqa: E402
from lockstep.train.resilience.healing import HealingState, SafeHTTPTransport, read_peer_state  # noqa: E402
from lockstep.train.trainer import Trainer  # noqa: E402
from tests.helpers import tiny_overrides  # noqa: E402

TIMEOUT = timedelta(seconds=30)


def deepseek(folder) -> Trainer:
    """deepseek_v3_debug, tiny: MoE with the router-bias update on, so healing must carry the biases."""
    overrides = tiny_overrides(folder) + ["--training.steps", "4", "--debug.fingerprint"]
    overrides[overrides.index("--model.flavor") + 1] = "debug"
    return Trainer(load_config("deepseek_v3_debug", overrides), show_progress=False)


def step(trainer: Trainer) -> dict:
    result = trainer.train_step(fingerprint=True)
    trainer.state.advance(result.samples * trainer.config.training.seq_len)
    return {"loss": result.loss_value, "grad_norm": result.grad_norm_value} | result.fingerprints


def test_a_fresh_group_healed_over_http_continues_bitwise(tmp_path):
    live, fresh = deepseek(tmp_path / "live"), deepseek(tmp_path / "fresh")
    with live, fresh:
        for _ in range(2):
            step(live)
        biases = {n: b.clone() for n, b in live.model.parts[0].named_buffers() if n.endswith("expert_bias")}
        assert biases and any(b.abs().sum() > 0 for b in biases.values())
        sender, receiver = SafeHTTPTransport(TIMEOUT, num_chunks=0), SafeHTTPTransport(TIMEOUT, num_chunks=0)
        try:
            state = {"user": {"default": HealingState(live.checkpoints.states).state_dict()}, "torchft": {"step": 2}}
            sender.send_checkpoint(dst_ranks=[1], step=2, state_dict=state, timeout=TIMEOUT)
            received = receiver.recv_checkpoint(src_rank=0, metadata=sender.metadata(), step=2, timeout=TIMEOUT)
        finally:
            sender.shutdown()
            receiver.shutdown()
        healing = HealingState(fresh.checkpoints.states)
        healing.load_state_dict(received["user"]["default"])
        assert healing.received == 1 and fresh.state.step == 2
        assert fresh.loader.next_sample_index == live.loader.next_sample_index
        healed_biases = dict(fresh.model.parts[0].named_buffers())
        assert all(torch.equal(healed_biases[n], b) for n, b in biases.items())
        for _ in range(2):  # optimizer moments, lr schedule, data position and weights all arrived
            assert step(fresh) == step(live)
        healed, reference = fresh.full_weights(), live.full_weights()
        assert healed.keys() == reference.keys()
        assert all(torch.equal(healed[name], reference[name]) for name in reference)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-a-peer",))


def test_a_peer_cannot_make_the_receiver_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "state"
    with path.open("wb") as f:
        _streaming_save({"user": {"default": {"model": Payload()}}}, f)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"), path.open("rb") as f:
        read_peer_state(f)
    assert not (tmp_path / "pwned-by-a-peer").exists()
    with pytest.raises(LockstepError, match="only http"):  # nor may a peer point the reader at a local file
        SafeHTTPTransport._load_from_address(path.as_uri(), TIMEOUT)
