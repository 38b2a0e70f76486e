"""lockstep.generate.loading, the parts that need no trained model: a path that is not a loadable source
is refused naming it and the reason (beyond the CLI's own tests: a file, a config.json without
safetensors, a run folder without a checkpoint, also where its config.toml names another checkpoint
folder, a config.toml that is not TOML); the tokenizer comes from --tokenizer-path (a note, not a
refusal, when it is not the recorded one), the Hugging Face folder's tokenizer.json (refused when absent)
or the run's recorded config, and one with more tokens than the model is refused; the device setting
resolves auto to cuda only where there is one. These matter because `lockstep generate` reads folders
users point it at: each wrong one must be one clear line, and a tokenizer that does not fit the model
must not index past its embedding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer as _Tokenizer
from tokenizers import models

from lockstep.data.tokenizer import BytesTokenizer, HFTokenizer
from lockstep.errors import InputError, LockstepError
from lockstep.generate import loading
from lockstep.generate.loading import Source, load_tokenizer, resolve_device, resolve_source


@pytest.mark.parametrize(
    "make,problem",
    [
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file, not a folder"),
        (lambda p: (p / "config.json").write_text("{}") and p, "has a config.json but no *.safetensors weights"),
        (lambda p: (p / "config.toml").write_text("[training]\nsteps = 3\n") and p,
         "is a run folder without a loadable checkpoint"),
        (lambda p: ((p / "checkpoint").mkdir(), (p / "config.toml").write_text('[checkpoint]\nfolder = "elsewhere"\n'))
         and p, "is a run folder without a loadable checkpoint"),
        (lambda p: (p / "config.toml").write_text("[training\n") and p, "is not valid TOML"),
    ],
    ids=["file", "config.json only", "run without checkpoint", "named folder absent", "bad toml"],
)  # fmt: skip
def test_a_path_that_is_no_source_is_refused_naming_it(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(InputError) as refused:
        resolve_source(path)
    assert problem in refused.value.problem
    assert refused.value.path.startswith(str(tmp_path))


def _hf_tokenizer(folder, size: int):
    folder.mkdir(exist_ok=True)
    vocab = {"<s>": 0, "</s>": 1} | {f"w{i}": i + 2 for i in range(size - 2)}
    _Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0")).save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def _source(path, kind: str, vocab_size: int, fingerprint: str | None = None) -> Source:
    config = {"model": {"tokenizer": "bytes"}}
    return Source(path, kind, spec=None, args=SimpleNamespace(vocab_size=vocab_size), config=config,
                  tokenizer_fingerprint=fingerprint)  # fmt: skip


def test_the_tokenizer_is_the_named_one_the_hf_folders_or_the_recorded_one(tmp_path, capsys):
    named = _hf_tokenizer(tmp_path / "named", 10)
    run = _source(tmp_path / "step-3", "lockstep", 300, fingerprint=BytesTokenizer.fingerprint)
    assert isinstance(load_tokenizer(run), BytesTokenizer)  # the recorded config's
    chosen = load_tokenizer(run, named)
    assert isinstance(chosen, HFTokenizer) and chosen.path == named
    assert capsys.readouterr().err == f"note: {named} is not the tokenizer {tmp_path / 'step-3'} was trained with\n"
    load_tokenizer(_source(tmp_path, "lockstep", 300, fingerprint=chosen.fingerprint), named)
    assert capsys.readouterr().err == ""  # the recorded one: no note
    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(InputError, match="has no tokenizer.json; pass --tokenizer-path"):
        load_tokenizer(_source(hf, "hf", 300))
    _hf_tokenizer(hf, 12)
    assert load_tokenizer(_source(hf, "hf", 300)).vocab_size == 12


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    with pytest.raises(LockstepError, match=r"the tokenizer has 258 tokens, the model in .* only 200"):
        load_tokenizer(_source(tmp_path, "lockstep", 200))
    assert load_tokenizer(_source(tmp_path, "lockstep", 258)).vocab_size == 258  # exactly the model's: fine


def test_the_device_resolves_auto_to_cuda_only_where_there_is_one(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(LockstepError, match="--device cuda: no CUDA device is available here"):
        resolve_device("cuda")
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
