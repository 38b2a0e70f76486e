"""lockstep.checkpoint.hf_tokenizer: the bytes tokenizer is written as a byte-level tokenizer.json whose
ids are the bytes' values (GPT-2's byte alphabet, written out here for a few bytes) and then BOS 256 and
EOS 257; an HF tokenizer's file is copied byte for byte; tokenizer_config.json and generation_config.json
name the run's BOS, EOS, pad (EOS) and length; ``recorded_tokenizer`` builds the tokenizer a run's recorded
config names, ignoring keys it does not know, and refuses a config that is missing or that gives another
tokenizer than the checkpoint's fingerprint. These matter because an exported model whose ids meant other
text would load and generate garbage with no error anywhere."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as _Tokenizer
from tokenizers import models, pre_tokenizers

from lockstep.checkpoint.hf_tokenizer import _bytes_to_unicode, recorded_tokenizer, write_tokenizer_files
from lockstep.data.tokenizer import BytesTokenizer, HFTokenizer
from lockstep.errors import InputError, LockstepError


def test_the_byte_alphabet_is_gpt2s():
    chars = _bytes_to_unicode()
    assert sorted(chars) == list(range(256)) and len(set(chars.values())) == 256
    assert set(chars.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    # GPT-2's table: printable bytes are themselves, the others shifted past 255 in byte order
    assert (chars[ord("A")], chars[ord("~")], chars[0xA1], chars[0xFF]) == ("A", "~", "\xa1", "\xff")
    assert (chars[0], chars[ord(" ")], chars[ord("\n")], chars[0x7F], chars[0xAD]) == ("Ā", "Ġ", "Ċ", "ġ", "Ń")


def test_the_bytes_tokenizer_is_written_as_byte_ids_then_bos_and_eos(tmp_path):
    write_tokenizer_files(BytesTokenizer(), tmp_path, 128)
    written = _Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    every_byte = bytes(range(1, 256)).decode("latin-1")  # code points 1-255: UTF-8 bytes 1-127, then pairs
    text = "\x00" + every_byte + " ✓ done"
    assert written.encode(text, add_special_tokens=False).ids == list(text.encode("utf-8"))
    assert (written.token_to_id("<|begin_of_text|>"), written.token_to_id("<|end_of_text|>")) == (256, 257)
    assert written.get_vocab_size(with_added_tokens=True) == BytesTokenizer.vocab_size
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "pad_token": "<|end_of_text|>", "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 128,
    }  # fmt: skip
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 257}


def _hf_tokenizer_file(folder) -> HFTokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tokenizer = _Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return HFTokenizer(folder / "tokenizer.json")


def test_an_hf_tokenizer_is_copied_byte_for_byte_with_its_special_tokens(tmp_path):
    source = _hf_tokenizer_file(tmp_path / "source")
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer_files(source, out, 32)
    assert (out / "tokenizer.json").read_bytes() == source.path.read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["model_max_length"]) == (
        "<s>", "</s>", "</s>", 32
    )  # fmt: skip
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_another_kind_of_tokenizer_is_refused(tmp_path):
    class Other:
        bos_id, eos_id = 0, 1

    with pytest.raises(LockstepError, match="cannot write tokenizer files for Other"):
        write_tokenizer_files(Other(), tmp_path, 8)
    assert list(tmp_path.iterdir()) == []


def test_the_recorded_config_names_the_tokenizer_checked_against_the_fingerprint(tmp_path):
    config = {"model": {"tokenizer": "bytes", "dim": 64, "not_a_field": 1}, "data": "not a section"}
    assert isinstance(recorded_tokenizer(tmp_path, config, BytesTokenizer.fingerprint), BytesTokenizer)
    assert isinstance(recorded_tokenizer(tmp_path, config, None), BytesTokenizer)  # nothing recorded to check
    source = _hf_tokenizer_file(tmp_path / "source")
    hf_config = {"model": {"tokenizer": "hf", "tokenizer_path": str(source.path)}}
    built = recorded_tokenizer(tmp_path, hf_config, source.fingerprint)
    assert isinstance(built, HFTokenizer) and built.fingerprint == source.fingerprint
    with pytest.raises(InputError, match="trained with another tokenizer than model.tokenizer = hf gives now") as e:
        recorded_tokenizer(tmp_path / "ckpt", hf_config, BytesTokenizer.fingerprint)
    assert e.value.path == str(tmp_path / "ckpt") and "--tokenizer-path" in e.value.fix
    with pytest.raises(InputError, match="has no recorded config to take the tokenizer from; pass --tokenizer-path"):
        recorded_tokenizer(tmp_path, None, None)
