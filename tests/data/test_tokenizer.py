import pytest

from lockstep.config import ConfigError
from lockstep.config.sections import DataConfig, ModelConfig
from lockstep.data.tokenizer import BUILTIN_VOCAB_SIZE, BytesTokenizer, HFTokenizer, build_tokenizer

TEXTS = ["Return the number of items in a container.", "Unicode: naïve café — 漢字 🙂", ""]


@pytest.mark.parametrize("kind", ["bytes", "builtin"])
def test_round_trip(kind):
    tokenizer = build_tokenizer(ModelConfig(tokenizer=kind), DataConfig())
    for text, ids in zip(TEXTS, tokenizer.encode_batch(TEXTS), strict=True):
        assert tokenizer.decode(ids) == text
        assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.bos_id != tokenizer.eos_id
    assert max(tokenizer.bos_id, tokenizer.eos_id) < tokenizer.vocab_size


def test_builtin_tokenizer_is_deterministic_and_cached(tmp_path):
    first = build_tokenizer(ModelConfig(), DataConfig())
    rebuilt = build_tokenizer(ModelConfig(), DataConfig(cache_folder=str(tmp_path)))  # trained afresh
    assert first.fingerprint == rebuilt.fingerprint
    assert first.vocab_size == BUILTIN_VOCAB_SIZE


def test_user_tokenizer_json(shared_tokenizer):
    tokenizer = HFTokenizer(shared_tokenizer)
    assert tokenizer.vocab_size > 2000
    assert tokenizer._tok.id_to_token(tokenizer.bos_id) == "<|begin_of_text|>"
    assert tokenizer._tok.id_to_token(tokenizer.eos_id) == "<|end_of_text|>"
    # This small test vocabulary has no token for the space byte, so round-trip text without spaces.
    ids = tokenizer.encode_batch(["Returnthenumberofitems."])[0]
    assert tokenizer.decode(ids) == "Returnthenumberofitems."


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        HFTokenizer(tmp_path)


def test_bytes_tokenizer_ids():
    assert BytesTokenizer().encode_batch(["A"]) == [[65]]
