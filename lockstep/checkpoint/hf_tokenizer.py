"""The tokenizer files of a Hugging Face export: what `AutoTokenizer`, `pipeline("text-generation")`,
lm-eval's `hf` model and vLLM read beside the weights.

- ``tokenizer.json``: the run's own (an HF tokenizer, the built-in one included, is copied as it is);
  the bytes tokenizer is written as a byte-level tokenizer with no merges, whose ids are the bytes'
  values and then BOS and EOS, as lockstep numbers them;
- ``tokenizer_config.json``: the special tokens and the trained sequence length;
- ``generation_config.json``: BOS, EOS and the pad id (EOS: lockstep pads nothing).

The tokenizer comes from the run's recorded config, checked against the fingerprint the checkpoint
recorded, or from a tokenizer.json the caller names.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Tokenizer
from tokenizers import decoders, models, pre_tokenizers

from lockstep.config.sections import DataConfig, ModelConfig
from lockstep.data.tokenizer import BytesTokenizer, HFTokenizer, Tokenizer, build_tokenizer
from lockstep.errors import InputError, LockstepError


def _section(cls: type, values: object) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names}) if isinstance(values, dict) else cls()


def recorded_tokenizer(where: Path, config: dict | None, fingerprint: str | None) -> Tokenizer:
    """The tokenizer a run's recorded `config` names, refused when it is not the one the checkpoint
    recorded (`fingerprint`): the model's ids would mean other text."""
    if config is None:
        raise InputError(where, "has no recorded config to take the tokenizer from", "pass --tokenizer-path")
    model = _section(ModelConfig, config.get("model", {}))
    tokenizer = build_tokenizer(model, _section(DataConfig, config.get("data", {})))
    if fingerprint not in (None, tokenizer.fingerprint):
        raise InputError(
            where, f"was trained with another tokenizer than model.tokenizer = {model.tokenizer} gives now",
            "pass --tokenizer-path with the tokenizer.json it was trained with",
        )  # fmt: skip
    return tokenizer


def _bytes_tokenizer_json() -> _Tokenizer:
    """BytesTokenizer as an HF tokenizer: each byte its own token (no merges), id = the byte's value."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    by_byte = _bytes_to_unicode()
    assert set(by_byte.values()) == set(alphabet)
    vocab = {by_byte[b]: b for b in range(256)}
    tokenizer = _Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])  # ids 256 and 257
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable bytes as themselves, the rest shifted past 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_tokenizer_files(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json for `tokenizer` in `out_dir`."""
    if isinstance(tokenizer, BytesTokenizer):
        hf = _bytes_tokenizer_json()
        hf.save(str(out_dir / "tokenizer.json"))
    elif isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.path, out_dir / "tokenizer.json")
        hf = _Tokenizer.from_file(str(tokenizer.path))
    else:
        raise LockstepError(f"cannot write tokenizer files for {type(tokenizer).__name__}")
    bos, eos = hf.id_to_token(tokenizer.bos_id), hf.id_to_token(tokenizer.eos_id)
    if hf.token_to_id(bos) != tokenizer.bos_id or hf.token_to_id(eos) != tokenizer.eos_id:
        raise LockstepError("the tokenizer.json written does not hold the run's BOS and EOS ids")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": eos,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
