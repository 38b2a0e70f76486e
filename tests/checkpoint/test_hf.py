"""Hugging Face interop against transformers itself (CPU, fp32, eager attention)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lockstep.checkpoint.hf import export_to_hf, import_from_hf
from lockstep.models.llama3 import hf_adapter
from lockstep.train.trainer import Trainer
from tests.checkpoint.helpers import CHECKPOINTED, train
from tests.distributed import run_on_ranks
from tests.helpers import tiny_config

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"
VOCAB = 2048  # the built-in tokenizer's, so a tiny run can start from these weights


def _tiny_hf_llama(folder):
    """A random transformers Llama with lockstep's `tiny` flavor shape, saved with save_pretrained."""
    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    model.save_pretrained(folder)
    return model


def _lockstep_model(args, state):
    from lockstep.models.llama3.model import Llama3

    with torch.device("meta"):
        model = Llama3(args)
    model.init_weights(0, "cpu")
    model.load_state_dict(state)
    return model.eval()


def test_imported_model_gives_transformers_logits(tmp_path):
    hf = _tiny_hf_llama(tmp_path / "hf")
    args = hf_adapter.args_from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    ours = _lockstep_model(args, hf_adapter.from_hf(hf.state_dict(), args))
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=0, atol=1e-5)
    back = hf_adapter.to_hf(ours.state_dict(), args)
    assert back.keys() == hf.state_dict().keys()
    assert all(torch.equal(back[k], hf.state_dict()[k]) for k in back)  # the round trip is exact


def test_exported_checkpoint_loads_in_transformers(tmp_path):
    train(tmp_path, ["--training.steps", "4"])
    timings = export_to_hf(tmp_path / "run", tmp_path / "hf")
    assert set(timings) == {"load_s", "convert_s", "save_s"}
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    hf.set_attn_implementation("eager")
    with Trainer(tiny_config(tmp_path, *CHECKPOINTED, "--training.steps", "4"), show_progress=False) as trainer:
        ours = trainer.model.parts[0].eval()  # resumed from step 4
        tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=0, atol=1e-5)


def test_convert_round_trip_through_the_cli_is_exact(tmp_path):
    _tiny_hf_llama(tmp_path / "hf")
    lockstep = os.path.join(os.path.dirname(sys.executable), "lockstep")
    for command in (["from-hf", tmp_path / "hf", tmp_path / "ckpt"], ["to-hf", tmp_path / "ckpt", tmp_path / "back"]):
        done = subprocess.run([lockstep, "convert", *map(str, command)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "save_s" in done.stdout
    original, back = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_sharded_export_writes_an_index(tmp_path):
    _tiny_hf_llama(tmp_path / "hf")
    import_from_hf(tmp_path / "hf", tmp_path / "ckpt")
    export_to_hf(tmp_path / "ckpt", tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sharded", local_files_only=True)
    assert torch.equal(hf.lm_head.weight, load_file(tmp_path / "hf" / "model.safetensors")["lm_head.weight"])


def _initial_weights(folder, hf_dir) -> None:
    overrides = [*CHECKPOINTED, "--checkpoint.initial_load_path", str(hf_dir)]
    with Trainer(tiny_config(folder, *overrides), show_progress=False) as trainer:
        weights = trainer.full_weights()
    if os.environ.get("RANK", "0") == "0":
        torch.save(weights, folder / "initial.pt")


def test_initial_load_path_reads_hf_weights_into_fsdp(tmp_path):
    hf = _tiny_hf_llama(tmp_path / "hf")
    run_on_ranks(_initial_weights, 2, tmp_path, tmp_path / "hf")
    args = hf_adapter.args_from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    expected = hf_adapter.from_hf(hf.state_dict(), args)
    loaded = torch.load(tmp_path / "initial.pt")
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)
