"""Fingerprints: a keyed sum over each element's raw bits and its global position, so any change of one
element shows, equal tensors agree, and the shards of a tensor sum to the whole tensor's digest."""

import pytest
import torch
from torch import nn

from lockstep.run.folder import read_metrics
from lockstep.train.observe import fingerprint
from lockstep.train.observe.fingerprint import ModuleOutputs, RankFingerprints, local_digest, model_fingerprint
from lockstep.train.trainer import Trainer
from tests.helpers import tiny_config


def _flip_last_bit(t: torch.Tensor, index: int) -> torch.Tensor:
    bits = t.clone().view(torch.int32).reshape(-1)
    bits[index] ^= 1
    return bits.view(torch.float32).reshape(t.shape)


def _hex(digest: torch.Tensor) -> str:
    """The digest's lanes as unsigned 64-bit hex words, as the fingerprint files write them."""
    return "".join(f"{word & (2**64 - 1):016x}" for word in digest.tolist())


def test_equal_tensors_have_equal_digests_and_any_last_bit_flip_changes_it():
    t = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(local_digest(t), local_digest(t.clone()))
    digests = {tuple(local_digest(t).tolist())}
    for index in range(t.numel()):
        digests.add(tuple(local_digest(_flip_last_bit(t, index)).tolist()))
    assert len(digests) == t.numel() + 1  # every one-bit change gives its own digest


def test_the_digest_reads_bits_and_positions_not_values():
    """-0.0 == 0.0 as numbers but not as bits; swapping two elements keeps the values but not the positions."""
    assert not torch.equal(local_digest(torch.tensor([0.0, 1.0])), local_digest(torch.tensor([-0.0, 1.0])))
    assert not torch.equal(local_digest(torch.tensor([1.0, 2.0])), local_digest(torch.tensor([2.0, 1.0])))
    assert not torch.equal(local_digest(torch.ones(2, 3)), local_digest(torch.ones(3, 2)))  # shape is position


def test_chunking_a_large_tensor_does_not_change_its_digest(monkeypatch):
    """Integer sums mod 2^64 are exact in any order: the rows hashed at once are free to choose."""
    t = torch.randn(7, 4, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    whole = local_digest(t)
    monkeypatch.setattr(fingerprint, "CHUNK_ELEMENTS", 8)  # two rows at a time, the last chunk one row
    assert torch.equal(local_digest(t), whole)


@pytest.mark.parametrize("dim", [0, 1])
def test_shards_digests_add_up_to_the_whole_tensors(monkeypatch, dim):
    """What makes fingerprints layout-free: each rank hashes its box at its global offset, and the parts
    sum (mod 2^64) to the unsharded digest, rows split (FSDP) or columns split (tensor parallel)."""
    t = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    whole = local_digest(t)
    first, second = (part.contiguous() for part in t.split([1, 3] if dim == 0 else [4, 2], dim=dim))
    offsets = {id(first): (0, 0), id(second): (1, 0) if dim == 0 else (0, 4)}
    monkeypatch.setattr(fingerprint, "shard_box", lambda part: (offsets[id(part)], tuple(part.shape)))
    assert torch.equal(local_digest(first) + local_digest(second), whole)
    offsets[id(second)] = (0, 0)  # the same shard placed at the wrong offset is another tensor
    assert not torch.equal(local_digest(first) + local_digest(second), whole)


def test_a_model_fingerprint_follows_the_name_order_not_the_dicts():
    a, b = torch.randn(2, 2), torch.randn(3)
    names = ["a", "b"]
    one = model_fingerprint({"a": a, "b": b}, names)
    assert model_fingerprint({"b": b.clone(), "a": a.clone()}, names) == one
    assert model_fingerprint({"a": b, "b": a}, names) != one  # the same tensors under each other's names
    assert model_fingerprint({"a": a, "b": _flip_last_bit(b, 2)}, names) != one
    assert model_fingerprint({"a": a}, names) != one  # a missing tensor shows


def test_a_model_fingerprint_hands_back_each_tensors_own_digest():
    named = {"w": torch.randn(2, 3), "s": torch.tensor(2.0)}  # a 0-dim tensor too
    local: dict[str, str] = {}
    model_fingerprint(named, ["w", "s", "absent"], local=local)
    assert set(local) == {"w", "s"}
    assert local["w"] == _hex(local_digest(named["w"]))
    assert len(local["s"]) == 32  # two 64-bit lanes, in hex


def test_module_outputs_keep_each_modules_first_output_only_and_close_removes_the_hooks():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    outputs = ModuleOutputs([model])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = model[0](x)
        model(x)
        model(x + 1)  # a second microbatch: not recorded
    digests = outputs.close()
    assert set(digests) == {"0", "1"}
    assert digests["0"] == _hex(local_digest(first)) and digests["1"] == _hex(local_digest(first.relu()))
    model(x - 1)
    assert outputs.digests == digests  # no hook left behind


def test_rank_fingerprints_read_the_newest_record_of_a_step_past_a_torn_line(tmp_path):
    """A resumed run may fingerprint a step twice: the later launch's record is the one its metrics show."""
    assert RankFingerprints.read(tmp_path, 0, 1) is None  # no file yet
    writer = RankFingerprints(tmp_path, 0)
    writer.write(1, {"param": {"w": "01"}})
    writer.write(2, {"param": {"w": "02"}})
    with open(writer.path, "a") as f:
        f.write('{"step": 1, "par\n')  # cut short by a crash
    writer.write(1, {"param": {"w": "03"}})
    assert RankFingerprints.read(tmp_path, 0, 1) == {"step": 1, "param": {"w": "03"}}
    assert RankFingerprints.read(tmp_path, 0, 2) == {"step": 2, "param": {"w": "02"}}
    assert RankFingerprints.read(tmp_path, 1, 1) is None  # another rank's file


def test_fingerprints_repeat_and_move_with_the_weights(tmp_path):
    runs = []
    for name in ("a", "b"):
        with Trainer(tiny_config(tmp_path / name, "--debug.fingerprint"), show_progress=False) as trainer:
            trainer.train()
        runs.append(read_metrics(tmp_path / name / "run"))
    a, b = runs
    assert [m["param_fingerprint"] for m in a] == [m["param_fingerprint"] for m in b]
    assert [m["grad_fingerprint"] for m in a] == [m["grad_fingerprint"] for m in b]
    assert len({m["param_fingerprint"] for m in a}) == len(a)  # every update changes the weights
