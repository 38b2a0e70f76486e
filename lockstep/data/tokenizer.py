"""Tokenizers: a Hugging Face tokenizer.json, a BPE trained on the built-in corpus, or raw bytes.

Documents are encoded without special tokens; the packer adds BOS and EOS itself, so every
tokenizer behaves the same at document boundaries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as _Tokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lockstep.config.errors import ConfigError
from lockstep.config.sections import DataConfig, ModelConfig
from lockstep.data.cache import atomic_path, cache_root
from lockstep.data.corpus import builtin_corpus
from lockstep.errors import InputError

BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
BUILTIN_VOCAB_SIZE = 2048
"""About the size of torchtitan's test tokenizer, so the debug model's throughput compares."""
BUILTIN_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    fingerprint: str
    """sha256 identifying the vocabulary and merges; recorded with runs and checked on resume."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class BytesTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS = 256 and EOS = 257."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257
    fingerprint = hashlib.sha256(b"lockstep-bytes-tokenizer-v1").hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json through the `tokenizers` library. BOS/EOS come from a tokenizer_config.json
    beside it when present, else from the usual special-token names."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError("model.tokenizer_path", f"no tokenizer.json at {path}")
        try:
            self._tok = _Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception for any unreadable file
            raise InputError(
                file,
                f"not a Hugging Face tokenizer.json ({e})",
                "point model.tokenizer_path at the tokenizer.json saved with the model (or its folder)",
            ) from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = hashlib.sha256(file.read_bytes()).hexdigest()
        self.path = file
        """The tokenizer.json read (a prepared dataset folder copies it, with its tokenizer_config.json)."""
        named = _special_tokens_from_config(file.parent / "tokenizer_config.json")
        self.bos_id = self._special_id(named.get("bos_token"), BOS_CANDIDATES, "BOS", file)
        self.eos_id = self._special_id(named.get("eos_token"), EOS_CANDIDATES, "EOS", file)

    def _special_id(self, configured: str | None, candidates: tuple[str, ...], what: str, file: Path) -> int:
        for token in ((configured,) if configured else ()) + candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ConfigError(
            "model.tokenizer_path",
            f"{file} has no {what} token (looked for {', '.join(candidates)}); add a tokenizer_config.json "
            f"naming {what.lower()}_token",
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def _special_tokens_from_config(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(
            path, f"is not valid JSON ({e})", "fix it or remove it (it names bos_token and eos_token)"
        ) from e
    if not isinstance(config, dict):
        raise InputError(path, "must be a JSON object", "fix it or remove it (it names bos_token and eos_token)")
    found = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            found[key] = value
    return found


def train_builtin_tokenizer(corpus_path: Path, corpus_sha256: str, cache_folder: str = "") -> Path:
    """Byte-level BPE with BUILTIN_VOCAB_SIZE tokens trained on the built-in corpus; cached by its sha."""
    folder = cache_root(cache_folder) / f"builtin-tokenizer-{corpus_sha256[:16]}"
    target = folder / "tokenizer.json"
    if target.exists():
        return target
    tokenizer = _Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BUILTIN_VOCAB_SIZE,
        special_tokens=BUILTIN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts():
        with open(corpus_path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    tokenizer.train_from_iterator(texts(), trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        tokenizer.save(str(tmp))
    return target


def build_tokenizer(model: ModelConfig, data: DataConfig) -> Tokenizer:
    """The tokenizer named by the model section (the built-in one is trained on first use)."""
    if model.tokenizer == "bytes":
        return BytesTokenizer()
    if model.tokenizer == "hf":
        return HFTokenizer(model.tokenizer_path)
    corpus = builtin_corpus(data.cache_folder)
    return HFTokenizer(train_builtin_tokenizer(corpus.train_path, corpus.sha256, data.cache_folder))
