"""``lockstep generate`` end to end: a trained run folder, its step folder and its Hugging Face export
give the same tokens; bad inputs are one line and exit 2."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lockstep.checkpoint.hf import export_to_hf
from lockstep.checkpoint.hf_import import import_from_hf
from lockstep.cli import main
from lockstep.data.corpus import builtin_corpus
from lockstep.data.tokenizer import train_builtin_tokenizer
from lockstep.errors import InputError
from lockstep.generate.loading import load_model, load_tokenizer, resolve_source
from lockstep.generate.loop import generate
from lockstep.generate.sampling import SamplingSettings
from lockstep.models.deepseek_v3 import hf_adapter as deepseek_hf
from lockstep.train.trainer import Trainer
from tests.generate.helpers import lively_model
from tests.helpers import tiny_config

LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")
PROMPTS = ["The module", "def"]
GREEDY = ["--greedy", "--max-new-tokens", "6", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step tiny Llama run (built-in tokenizer) with a checkpoint at step 2."""
    folder = tmp_path_factory.mktemp("generate")
    with Trainer(tiny_config(folder, "--training.steps", "2", "--checkpoint.enable"), show_progress=False) as trainer:
        trainer.train()
    return folder / "run"


def _json_lines(capsys, *argv: str) -> list[dict]:
    assert main(["generate", *argv]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_json_from_a_run_folder_its_step_folder_and_its_hf_export(run, tmp_path, capsys):
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [LOCKSTEP, "generate", str(run), *prompts, *GREEDY, "--json"], capture_output=True, text=True, env=env,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    source = resolve_source(run)
    tokenizer = load_tokenizer(source)
    expected_ids = [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(PROMPTS)]
    model = load_model(source, torch.device("cpu"))
    expected = generate(model, expected_ids, SamplingSettings(max_new_tokens=6, greedy=True), tokenizer.eos_id)
    assert [r["prompt_ids"] for r in records] == expected_ids
    assert [r["generated_ids"] for r in records] == expected
    assert [r["text"] for r in records] == [tokenizer.decode(ids) for ids in expected]

    step = run / "checkpoint" / "step-00000002"
    assert _json_lines(capsys, str(step), *prompts, *GREEDY, "--json") == records
    export_to_hf(step, tmp_path / "hf")
    corpus = builtin_corpus("")
    shutil.copy(train_builtin_tokenizer(corpus.train_path, corpus.sha256), tmp_path / "hf" / "tokenizer.json")
    assert _json_lines(capsys, str(tmp_path / "hf"), *prompts, *GREEDY, "--json") == records

    # One prompt streams its text; it is the prompt followed by what --json decoded.
    assert main(["generate", str(run), "--prompt", PROMPTS[0], *GREEDY]) == 0
    assert capsys.readouterr().out == PROMPTS[0] + records[0]["text"] + "\n"


def test_a_seed_repeats_through_the_cli(run, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("The module\n\ndef\n")
    sampled = [str(run), "--prompts-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "8", "--json",
               "--temperature", "1.2", "--top-k", "100", "--batch-size", "1"]  # fmt: skip
    first = _json_lines(capsys, *sampled, "--seed", "4")
    assert len(first) == 2  # the blank line is skipped
    assert _json_lines(capsys, *sampled, "--seed", "4", "--batch-size", "2") == first
    assert _json_lines(capsys, *sampled, "--seed", "5") != first


def _bin_only(tmp_path):
    folder = tmp_path / "bin_only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    return folder


@pytest.mark.parametrize(
    "make, options, fragment",
    [
        (lambda tmp_path: tmp_path / "missing", [], "does not exist"),
        (_bin_only, [], "pickled weights"),
        (lambda tmp_path: tmp_path, ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (lambda tmp_path: tmp_path, [], "holds no lockstep checkpoint"),
    ],
    ids=["missing folder", "bin weights only", "top-p out of range", "empty folder"],
)
def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys, make, options, fragment):
    assert main(["generate", str(make(tmp_path)), "--prompt", "x", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lockstep generate: error: ") and fragment in err
    assert err.count("\n") == 1


def test_max_new_tokens_beyond_this_machine_is_one_line_before_allocating(run, capsys):
    """1e9 new tokens used to end in an allocation traceback (the RoPE table alone is 256 GB)."""
    assert main(["generate", str(run), "--prompt", "x", "--max-new-tokens", "1000000000", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lockstep generate: error: --max-new-tokens: ") and err.count("\n") == 1
    assert "GiB for the RoPE table and the KV cache" in err


def test_exit_code_2_from_the_installed_command(tmp_path):
    done = subprocess.run([LOCKSTEP, "generate", str(tmp_path / "missing"), "--prompt", "x"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "does not exist" in done.stderr


def test_the_router_bias_travels_and_a_checkpoint_without_it_is_refused(tmp_path, monkeypatch):
    """`convert from-hf` carries DeepSeek-V3's router bias (e_score_correction_bias, a buffer) into the
    checkpoint; a checkpoint without it is refused, since generating from it would route differently
    from the model it came from."""
    model = lively_model("deepseek_v3")
    hf_state = {k: v.contiguous() for k, v in deepseek_hf.to_hf(model.state_dict(), model.args).items()}
    (tmp_path / "hf").mkdir()
    save_file(hf_state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(deepseek_hf.hf_config(model.args)))
    import_from_hf(tmp_path / "hf", tmp_path / "ckpt", "deepseek_v3")
    for source in ("hf", "ckpt"):
        loaded = load_model(resolve_source(tmp_path / source), torch.device("cpu"))
        pairs = zip(model.moe_modules(), loaded.moe_modules(), strict=True)
        assert all(torch.equal(a.expert_bias, b.expert_bias) for a, b in pairs)
    import lockstep.checkpoint.hf_import as hf_import

    monkeypatch.setattr(hf_import, "persistent_tensors", lambda module: dict(module.named_parameters()))
    import_from_hf(tmp_path / "hf", tmp_path / "parameters_only", "deepseek_v3")
    with pytest.raises(InputError, match=r"lacks 3 of the model's tensors \(layers.1.moe.expert_bias"):
        load_model(resolve_source(tmp_path / "parameters_only"), torch.device("cpu"))
