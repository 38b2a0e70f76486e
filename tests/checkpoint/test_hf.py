"""Hugging Face interop against transformers itself (CPU, fp32, eager attention)."""

import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointError
from lockstep.checkpoint.hf import check_hf_config, export_to_hf, load_hf_weights, read_model_weights
from lockstep.checkpoint.hf_import import import_from_hf
from lockstep.checkpoint.states import persistent_tensors
from lockstep.config import load_config
from lockstep.config.sections import ModelConfig
from lockstep.models.common.rope import Llama3RopeScaling
from lockstep.models.deepseek_v3 import hf_adapter as deepseek_hf
from lockstep.models.llama3 import LLAMA3_FLAVORS, hf_adapter
from lockstep.models.registry import model_args, model_spec
from lockstep.train.trainer import Trainer
from tests.checkpoint.crafting import Payload
from tests.checkpoint.helpers import CHECKPOINTED, train
from tests.distributed import run_on_ranks
from tests.helpers import run_cli, tiny_config, tiny_overrides
from tests.models.llama4.helpers import tiny_hf_llama4
from tests.models.qwen3.helpers import tiny_hf_qwen3

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"
VOCAB = 2048  # the built-in tokenizer's, so a tiny run can start from these weights


def _tiny_hf_llama(folder, kv_heads: int = 2):
    """A random transformers Llama with lockstep's `tiny` flavor shape, saved with save_pretrained."""
    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads,
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
        text = "def main():\n    return 0  # héllo"
        auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
        assert auto(text, add_special_tokens=False)["input_ids"] == trainer.tokenizer.encode_batch([text])[0]
        assert (auto.bos_token_id, auto.eos_token_id) == (trainer.tokenizer.bos_id, trainer.tokenizer.eos_id)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == auto.eos_token_id
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    out = pipe("def main", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("def main") and len(out) > len("def main")


def test_the_bytes_tokenizer_exports_as_a_tokenizer_transformers_loads(tmp_path):
    from lockstep.checkpoint.hf_tokenizer import write_tokenizer_files
    from lockstep.data.tokenizer import BytesTokenizer

    write_tokenizer_files(BytesTokenizer(), tmp_path, 64)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "héllo wörld\n\t ~ \x00 ünïcode ✓"
    ids = auto(text, add_special_tokens=False)["input_ids"]
    assert ids == BytesTokenizer().encode_batch([text])[0] and auto.decode(ids) == text
    assert (auto.bos_token_id, auto.eos_token_id, auto.model_max_length) == (256, 257, 64)


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
    before = {p.name: p.read_bytes() for p in (tmp_path / "sharded").iterdir()}
    with pytest.raises(CheckpointError, match="never overwrites"):  # nor into a checkpoint's own folder
        export_to_hf(tmp_path / "ckpt", tmp_path / "sharded")
    assert {p.name: p.read_bytes() for p in (tmp_path / "sharded").iterdir()} == before


def _files_union(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


@pytest.mark.parametrize("model", ["llama3", "deepseek_v3"])
def test_streamed_export_in_many_files_equals_the_whole_model_conversion(tmp_path, model):
    """One tensor per file (max_shard_bytes=1): Llama's q/k rows are permuted per tensor, and each
    DeepSeek grouped-expert tensor is the source of one file per expert; the files together hold
    exactly what converting the whole model at once gives, and the index names each tensor's file."""
    if model == "llama3":
        _tiny_hf_llama(tmp_path / "hf")
    else:
        spec, args = model_args(ModelConfig(name=model, flavor="debug"), VOCAB, 32)
        hf_state = {k: v.contiguous() for k, v in deepseek_hf.to_hf(_deepseek_weights(spec, args), args).items()}
        (tmp_path / "hf").mkdir()
        save_file(hf_state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / "hf" / "config.json").write_text(json.dumps(deepseek_hf.hf_config(args)))
    import_from_hf(tmp_path / "hf", tmp_path / "ckpt", model)
    export_to_hf(tmp_path / "ckpt", tmp_path / "files", max_shard_bytes=1)
    step0 = folders.step_folder(tmp_path / "ckpt", 0)
    manifest = folders.read_manifest(step0)
    spec = model_spec(model)
    args = spec.args_from_dict(manifest["model"]["args"])
    whole = spec.hf_adapter.to_hf(read_model_weights(step0), args)  # what the export was before streaming
    index = json.loads((tmp_path / "files" / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == list(whole)
    assert len(set(index["weight_map"].values())) == len(whole)
    union = _files_union(tmp_path / "files")
    assert union.keys() == whole.keys()
    assert all(torch.equal(union[k], whole[k]) for k in whole)
    assert all(torch.equal(union[k], v) for k, v in load_file(tmp_path / "hf" / "model.safetensors").items())


# `tiny` with one kv head: wk's 16 rows (one head) split 8/8 over 2 ranks, so the q/k permutation
# meets a shard boundary inside a head; wq's 4 heads split 2/2 on head boundaries.
TINY_MQA = ["--model.flavor", "tiny_mqa"]


def _deepseek_weights(spec, args) -> dict[str, torch.Tensor]:
    """A tiny DeepSeek-V3's checkpoint tensors, with a non-zero router bias (a persistent buffer, which
    must travel with the parameters)."""
    with torch.device("meta"):
        model = spec.build(args, "sdpa")
    model.init_weights(5, "cpu")
    tensors = {name: t.detach() for name, t in persistent_tensors(model).items()}
    biases = [name for name in tensors if name.endswith("expert_bias")]
    assert biases
    for name in biases:
        tensors[name].copy_(torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(3)))
    return tensors


def _initial_weights(folder, hf_dir, config: str, overrides: list[str]) -> None:
    LLAMA3_FLAVORS["tiny_mqa"] = dataclasses.replace(LLAMA3_FLAVORS["tiny"], n_kv_heads=1)
    overrides = [*CHECKPOINTED, "--checkpoint.initial_load_path", str(hf_dir), *overrides]
    with Trainer(load_config(config, tiny_overrides(folder) + overrides), show_progress=False) as trainer:
        assert all(p.to_local().numel() < p.numel() for p in trainer.model.parts[0].parameters())  # sharded
        weights = trainer.full_weights()
        weights |= {n: b.clone() for n, b in persistent_tensors(trainer.model.parts[0]).items() if n not in weights}
    if os.environ.get("RANK", "0") == "0":
        torch.save(weights, folder / "initial.pt")


def _one_process_load(hf_dir, model: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `lockstep convert from-hf` reads: whole tensors, in one process."""
    spec = model_spec(model)
    args = spec.hf_adapter.args_from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    weights = {name: torch.empty_like(value) for name, value in expected.items()}
    load_hf_weights(hf_dir, spec, args, weights)
    return weights


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)


def test_initial_load_path_reads_hf_weights_into_fsdp(tmp_path):
    hf = _tiny_hf_llama(tmp_path / "hf", kv_heads=1)
    run_on_ranks(_initial_weights, 2, tmp_path, tmp_path / "hf", "llama3_debug", TINY_MQA)
    args = hf_adapter.args_from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    expected = hf_adapter.from_hf(hf.state_dict(), args)
    _assert_same(torch.load(tmp_path / "initial.pt"), expected)
    _assert_same(_one_process_load(tmp_path / "hf", "llama3", expected), expected)


def test_initial_load_path_reads_deepseek_hf_weights_into_fsdp(tmp_path):
    """Grouped experts [E, out, in] come from one Hugging Face tensor per expert: each rank reads its
    experts only. The fused in-memory layout of transformers (gate_up_proj) reads the same."""
    spec, args = model_args(ModelConfig(name="deepseek_v3", flavor="debug"), VOCAB, 32)
    expected = _deepseek_weights(spec, args)
    hf_state = {k: v.contiguous() for k, v in deepseek_hf.to_hf(expected, args).items()}
    for folder, state in (("hf", hf_state), ("fused", _fused_experts(hf_state))):
        (tmp_path / folder).mkdir()
        save_file(state, tmp_path / folder / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / folder / "config.json").write_text(json.dumps(deepseek_hf.hf_config(args)))
        _assert_same(_one_process_load(tmp_path / folder, "deepseek_v3", expected), expected)
    run_on_ranks(_initial_weights, 2, tmp_path, tmp_path / "hf", "deepseek_v3_debug", ["--model.flavor", "debug"])
    _assert_same(torch.load(tmp_path / "initial.pt"), expected)


def test_a_missing_or_misshapen_hf_tensor_is_refused_before_reading(tmp_path):
    hf = _tiny_hf_llama(tmp_path / "hf")
    args = hf_adapter.args_from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    expected = hf_adapter.from_hf(hf.state_dict(), args)
    state = load_file(tmp_path / "hf" / "model.safetensors")
    for problem, broken in (
        ("has no tensor lm_head.weight", {k: v for k, v in state.items() if k != "lm_head.weight"}),
        (r"holds model.norm.weight of shape \[32\]", state | {"model.norm.weight": torch.ones(32)}),
    ):
        save_file(broken, tmp_path / "hf" / "model.safetensors")
        with pytest.raises(CheckpointError, match=problem):
            _one_process_load(tmp_path / "hf", "llama3", expected)


def test_a_config_with_fewer_layers_than_its_weights_is_refused(tmp_path):
    """config.json edited down to 1 layer over 2 layers of weights used to load as a 1-layer model."""
    hf = _tiny_hf_llama(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    full = hf_adapter.from_hf(hf.state_dict(), hf_adapter.args_from_hf_config(config))
    config["num_hidden_layers"] = 1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    first_layer = {k: v for k, v in full.items() if not k.startswith("layers.1.")}
    with pytest.raises(CheckpointError, match="holds weights of 2 layers, its config.json describes 1"):
        _one_process_load(tmp_path / "hf", "llama3", first_layer)


def _fused_experts(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory DeepSeek-V3 layout: per layer gate_up_proj [E, 2I, H] and down_proj."""
    fused, experts = {}, {}
    for name, value in hf_state.items():
        prefix, _, rest = name.partition(".mlp.experts.")
        if not rest:
            fused[name] = value
            continue
        expert, projection, _ = rest.split(".")
        experts.setdefault(prefix, {}).setdefault(projection, {})[int(expert)] = value
    for prefix, by_projection in experts.items():
        stacked = {k: torch.stack([v[e] for e in sorted(v)]) for k, v in by_projection.items()}
        fused[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([stacked["gate_proj"], stacked["up_proj"]], 1)
        fused[f"{prefix}.mlp.experts.down_proj"] = stacked["down_proj"]
    return fused


LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")


def _convert(*args) -> subprocess.CompletedProcess:
    command = [LOCKSTEP, "convert", *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )


def _tiny_hf(folder, model: str) -> dict[str, torch.Tensor]:
    """A tiny Hugging Face folder of `model`; returns the lockstep weights it holds. Llama has one kv
    head, so on 2 ranks the q/k row permutation meets a shard boundary inside a head; so does the
    permutation of Qwen3's QK-norm weights (one head of 64 rows)."""
    if model == "llama3":
        hf = _tiny_hf_llama(folder, kv_heads=1)
        args = hf_adapter.args_from_hf_config(json.loads((folder / "config.json").read_text()))
        return hf_adapter.from_hf(hf.state_dict(), args)
    if model in ("qwen3", "qwen3_moe", "llama4"):
        if model == "llama4":  # fused, transposed experts: each rank reads a box of them
            hf, args = tiny_hf_llama4(vocab_size=VOCAB)
        else:
            hf, args = tiny_hf_qwen3(moe=model == "qwen3_moe", tied=model == "qwen3", vocab_size=VOCAB)
        hf.save_pretrained(folder)
        expected = model_spec(model).hf_adapter.from_hf(hf.state_dict(), args)
        return {k: v for k, v in expected.items() if k != "output.weight" or not args.tie_embeddings}
    spec, args = model_args(ModelConfig(name=model, flavor="debug"), VOCAB, 32)
    expected = _deepseek_weights(spec, args)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in deepseek_hf.to_hf(expected, args).items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(deepseek_hf.hf_config(args)))
    return expected


@pytest.mark.parametrize("model", ["llama3", "deepseek_v3", "qwen3", "qwen3_moe", "llama4"])
def test_from_hf_on_two_ranks_writes_the_one_process_checkpoint(tmp_path, model):
    """`convert from-hf --nproc 2` (torchrun): each rank writes only its shard, and the checkpoint
    holds bitwise the tensors of the one-process conversion, with the same manifest but its files."""
    expected = _tiny_hf(tmp_path / "hf", model)
    import_from_hf(tmp_path / "hf", tmp_path / "one", model)
    done = _convert("from-hf", tmp_path / "hf", tmp_path / "two", "--nproc", "2")  # the family from model_type
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1 and "save_s" in done.stdout  # rank 0 reports
    one, two = folders.step_folder(tmp_path / "one", 0), folders.step_folder(tmp_path / "two", 0)
    shards = sorted(two.glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]
    whole = sum(p.stat().st_size for p in one.glob("*.distcp"))
    assert all(p.stat().st_size < 0.6 * whole for p in shards)  # about half the model each
    _assert_same(read_model_weights(two), read_model_weights(one))
    _assert_same(read_model_weights(one), expected)
    recorded = [
        {k: v for k, v in folders.read_manifest(f).items() if k not in ("files", "checksums")} for f in (one, two)
    ]
    assert recorded[0] == recorded[1]


def test_from_hf_refusals_are_one_line_before_or_after_the_launch(tmp_path, capfd):
    """Pickled weights and a non-empty output folder are refused before any process starts; a
    folder that lacks a tensor is found by the ranks, and its one line comes back once. Nothing is
    published."""
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    _tiny_hf_llama(tmp_path / "hf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "broken" / "model.safetensors")
    for before_launch, source, out, problem in (
        (True, pickled, tmp_path / "a", r"pickled weights \(pytorch_model.bin\)"),
        (True, tmp_path / "hf", tmp_path / "full", "exists and is not an empty folder; an import never overwrites"),
        (False, tmp_path / "broken", tmp_path / "b", r"rank \d: .*has no tensor lm_head.weight"),
    ):
        if before_launch:  # in this process: run_cli fails the test if it launches
            code, stdout, stderr = run_cli(["convert", "from-hf", source, out, "--nproc", "2"], capfd)
        else:  # the ranks' one line, through a real `lockstep` and torchrun
            done = _convert("from-hf", source, out, "--nproc", "2")
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        assert code == 2, stdout[-2000:] + stderr[-2000:]
        errors = [line for line in stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("lockstep convert: error: "), stderr
        assert re.search(problem, errors[0]), errors[0]
        assert "Traceback" not in stderr and not folders.published_steps(out)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]


def _hf_folder(folder, model: str) -> None:
    """A tiny Hugging Face folder of any family: transformers' own save_pretrained for Llama and Qwen3
    (tied, as the small Qwen3 checkpoints are), lockstep's export layout for DeepSeek-V3."""
    if model == "llama3":
        _tiny_hf_llama(folder)
    elif model == "deepseek_v3":
        _tiny_hf(folder, model)
    elif model == "llama4":
        tiny_hf_llama4(vocab_size=VOCAB)[0].save_pretrained(folder)
    else:
        hf, _ = tiny_hf_qwen3(moe=model == "qwen3_moe", tied=model == "qwen3", vocab_size=VOCAB)
        hf.save_pretrained(folder)


@pytest.mark.parametrize("model", ["llama3", "deepseek_v3", "qwen3", "qwen3_moe", "llama4"])
def test_from_hf_picks_the_family_from_model_type_and_round_trips_exactly(tmp_path, model):
    """No --model: config.json's model_type names the family; to-hf then writes the same tensors back
    (a tied Qwen3 holds no lm_head.weight, as transformers saves it; experts one tensor per expert)."""
    _hf_folder(tmp_path / "hf", model)
    import_from_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert folders.read_manifest(folders.step_folder(tmp_path / "ckpt", 0))["model"]["name"] == model
    export_to_hf(tmp_path / "ckpt", tmp_path / "back")
    original, back = _files_union(tmp_path / "hf"), _files_union(tmp_path / "back")
    assert ("lm_head.weight" in original) == (model != "qwen3")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"]


def test_convert_cli_round_trips_a_tied_qwen3_and_transformers_reads_it_back(tmp_path):
    hf, _ = tiny_hf_qwen3(moe=False, tied=True, vocab_size=VOCAB)
    hf.save_pretrained(tmp_path / "hf")
    for command in (["from-hf", tmp_path / "hf", tmp_path / "ckpt"], ["to-hf", tmp_path / "ckpt", tmp_path / "back"]):
        done = _convert(*command)
        assert done.returncode == 0, done.stderr[-2000:]
    back = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    assert back.config.tie_word_embeddings and back.lm_head.weight is back.model.embed_tokens.weight
    back.set_attn_implementation("eager")
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, hf(tokens).logits)


LLAMA32_SCALING = {
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}  # fmt: skip


def _tiny_hf_llama32(folder):
    """A random transformers Llama configured as Llama 3.2 1B is, in miniature: tied embeddings and
    Llama 3 RoPE scaling at factor 32; save_pretrained writes no lm_head.weight."""
    torch.manual_seed(5)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling=LLAMA32_SCALING, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    model.save_pretrained(folder)
    return model


def test_a_tied_llama32_config_round_trips_exactly_through_the_cli(tmp_path):
    hf = _tiny_hf_llama32(tmp_path / "hf")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in original
    args = hf_adapter.args_from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    assert args.tie_embeddings and args.rope_scaling == Llama3RopeScaling(factor=32.0)
    state = hf_adapter.from_hf(original, args)
    with torch.device("meta"):
        assert state.keys() == persistent_tensors(model_spec("llama3").build(args, "sdpa")).keys()
    back = hf_adapter.to_hf(state, args)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)

    for command in (["from-hf", tmp_path / "hf", tmp_path / "ckpt"], ["to-hf", tmp_path / "ckpt", tmp_path / "back"]):
        done = _convert(*command)
        assert done.returncode == 0, done.stderr[-2000:]
    exported = load_file(tmp_path / "back" / "model.safetensors")
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is True
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    reloaded.set_attn_implementation("eager")
    weights = read_model_weights(folders.step_folder(tmp_path / "ckpt", 0))
    ours = _lockstep_model(args, weights | {"output.weight": weights["tok_embeddings.weight"]})  # state_dict's alias
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=0, atol=1e-5)
    output = torch.empty(VOCAB, 64)  # a layout that asks for the output projection reads the embedding
    load_hf_weights(tmp_path / "hf", model_spec("llama3"), args, {"output.weight": output})
    assert torch.equal(output, original["model.embed_tokens.weight"])


def test_a_tied_llama3_trains_from_a_tied_config_and_exports_what_transformers_ties(tmp_path):
    """--model.flavor from_hf takes tie_word_embeddings from config.json; the run trains, saves one
    embedding tensor, and its export loads in transformers, tied, with lockstep's logits."""
    hf = _tiny_hf_llama32(tmp_path / "hf")
    overrides = ["--model.flavor", "from_hf", "--checkpoint.initial_load_path", str(tmp_path / "hf"),
                 "--training.steps", "2", "--checkpoint.enable"]  # fmt: skip
    with Trainer(tiny_config(tmp_path, *overrides), show_progress=False) as trainer:
        model = trainer.model.parts[0]
        assert trainer.model.args.tie_embeddings and model.output.weight is model.tok_embeddings.weight
        assert torch.equal(model.tok_embeddings.weight, hf.model.embed_tokens.weight)
        trainer.train()
        step = folders.published_steps(tmp_path / "run" / "checkpoint")[-1][1]
        assert "output.weight" not in read_model_weights(step)
        export_to_hf(step, tmp_path / "export")
        exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True).eval()
        assert exported.config.tie_word_embeddings and exported.lm_head.weight is exported.model.embed_tokens.weight
        assert "lm_head.weight" not in load_file(tmp_path / "export" / "model.safetensors")
        exported.set_attn_implementation("eager")
        tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(exported(tokens).logits, model.eval()(tokens), rtol=0, atol=1e-5)


def test_a_folder_of_another_family_is_refused_for_initial_weights(tmp_path):
    from lockstep.checkpoint.hf import check_hf_config

    _hf_folder(tmp_path / "hf", "qwen3")
    spec, args = model_args(ModelConfig(name="llama3", flavor="tiny"), VOCAB, 32)
    with pytest.raises(ValueError, match="is a qwen3 model, this run's is llama3"):
        check_hf_config(tmp_path / "hf", spec, args)


def test_llama4_flavor_from_hf_reads_its_shape_and_each_rank_its_expert_boxes(tmp_path):
    """`--model.flavor from_hf` on a transformers Llama 4 folder (fused, transposed experts) under EP 2:
    the shape comes from config.json, and each rank reads its experts through transposed views. A
    run whose flavor differs in the attention alone (chunk, temperature) is refused the folder."""
    hf, args = tiny_hf_llama4(vocab_size=VOCAB)
    hf.save_pretrained(tmp_path / "hf")
    overrides = ["--model.name", "llama4", "--model.flavor", "from_hf", "--parallelism.expert_parallel_degree", "2"]
    run_on_ranks(_initial_weights, 2, tmp_path, tmp_path / "hf", "llama4_debug", overrides)
    expected = model_spec("llama4").hf_adapter.from_hf(hf.state_dict(), args)
    _assert_same(torch.load(tmp_path / "initial.pt"), expected)
    spec, debug = model_args(ModelConfig(name="llama4", flavor="debug"), VOCAB, 128)
    same_shape = dataclasses.replace(args, attention_chunk_size=64)  # the weights fit; the attention differs
    with pytest.raises(CheckpointError, match="attention_chunk_size: 16 vs 64"):
        check_hf_config(tmp_path / "hf", spec, same_shape)
    with pytest.raises(CheckpointError, match="floor_scale: 8 vs 32"):
        check_hf_config(tmp_path / "hf", spec, dataclasses.replace(debug, rope_scaling=args.rope_scaling))


def test_hugging_face_pickles_are_never_read(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    torch_pickle = pickle.dumps(Payload(tmp_path / "pwned"))
    (hf / "pytorch_model.bin").write_bytes(torch_pickle)
    with pytest.raises(CheckpointError, match=r"pickled weights \(pytorch_model.bin\).*safetensors"):
        import_from_hf(hf, tmp_path / "out")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        Trainer(tiny_config(tmp_path, "--checkpoint.initial_load_path", str(hf)))
    assert not (tmp_path / "pwned").exists()
