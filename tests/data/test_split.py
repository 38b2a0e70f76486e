"""data.validation_fraction: whole documents held out of one source, by a pure function of their index."""

import json
import random

import numpy as np
import pytest

from lockstep.config import validate_job_config
from lockstep.config.errors import ConfigError
from lockstep.config.sections import DataConfig, TrainingConfig
from lockstep.data.loader import DataLoader, build_token_windows, held_out_windows, source_windows
from lockstep.data.prepare import prepare
from lockstep.data.provenance import sample_sources
from lockstep.data.shard_plan import plan_files
from lockstep.data.sources import file_source
from lockstep.data.split import held_out
from lockstep.data.tokenizer import BytesTokenizer
from lockstep.run.folder import read_metrics
from lockstep.tools.evaluate import evaluation_config
from lockstep.train.trainer import Trainer
from tests.distributed import run_in_folder
from tests.helpers import tiny_config

TOKENIZER = BytesTokenizer()
FRACTION = 0.1


def _documents(count: int = 600) -> list[str]:
    rng = random.Random(1)
    words = "ab cd ef gh ij".split()
    return [f"doc{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for i in range(count)]


def _corpus(folder) -> list[str]:
    """Two jsonl files (the first cut into byte ranges at a small shard size) and their documents in order."""
    documents = _documents()
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("a.jsonl", documents[:500]), ("b.jsonl", documents[500:])):
        (folder / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return documents


def _prepared(corpus, out, shard_bytes: int) -> TrainingConfig:
    source, tasks = plan_files(file_source("json", str(corpus), "text"), shard_bytes)
    prepare(source, tasks, str(corpus), TOKENIZER, out, show_progress=False, log=lambda line: None)
    return TrainingConfig(dataset="prepared", dataset_path=str(out), seq_len=32)


def _texts(tokens) -> list[str]:
    """The documents of a token stream (bytes tokenizer: BOS 256, ids, EOS 257)."""
    stream = np.asarray(tokens[0 : len(tokens)]).tolist()
    texts, current = [], []
    for token in stream:
        if token == TOKENIZER.bos_id:
            current = []
        elif token == TOKENIZER.eos_id:
            texts.append(bytes(current).decode())
        else:
            current.append(token)
    return texts


def test_the_sides_are_disjoint_and_together_every_document_once(tmp_path):
    documents = _corpus(tmp_path / "in")
    training = _prepared(tmp_path / "in", tmp_path / "out", 4 << 10)
    data = DataConfig(validation_fraction=FRACTION)
    train = build_token_windows(training, data, TOKENIZER)
    validation = held_out_windows(training, data, TOKENIZER, seq_len=16)
    chosen = held_out(np.arange(len(documents)), FRACTION)
    assert _texts(validation.tokens) == [d for d, c in zip(documents, chosen, strict=True) if c]
    assert _texts(train.tokens) == [d for d, c in zip(documents, chosen, strict=True) if not c]
    assert len(train.tokens) + len(validation.tokens) == len(source_windows(training, data, TOKENIZER).tokens)
    assert validation.seq_len == 16 and train.seq_len == 32
    assert len({train.fingerprint, validation.fingerprint, source_windows(training, data, TOKENIZER).fingerprint}) == 3
    # The loss denominator counts from the document index: the same as counting BOS labels in the windows.
    windows = list(range(train.num_windows))
    assert train.valid_tokens(windows) == sum(int((train.batch([w])[1] >= 0).sum()) for w in windows)
    # A training sample is traced to its document in the file, as in an unsplit folder.
    loader = DataLoader(train, seed=3, global_batch=4, local_batch=2)
    for found in sample_sources(train, loader.order, range(8), TOKENIZER):
        index = found.document + (500 if found.file.endswith("b.jsonl") else 0)
        document = [TOKENIZER.bos_id, *documents[index].encode(), TOKENIZER.eos_id]
        assert not chosen[index] and int(train.window(found.window)[0]) == document[found.offset]


def test_the_fraction_is_honoured():
    for fraction in (0.01, 0.1, 0.5):
        share = held_out(np.arange(200_000), fraction).mean()
        assert abs(share - fraction) < 4 * (fraction * (1 - fraction) / 200_000) ** 0.5


def test_the_split_is_the_same_at_any_shard_count_and_through_the_cache(tmp_path):
    """Small shards, one shard per file, and the automatic preparation of the raw files: the same sides."""
    _corpus(tmp_path / "in")
    data = DataConfig(validation_fraction=FRACTION, cache_folder=str(tmp_path / "cache"))
    raw = TrainingConfig(dataset="json", dataset_path=str(tmp_path / "in"), seq_len=32)
    small = _prepared(tmp_path / "in", tmp_path / "small", 2 << 10)
    big = _prepared(tmp_path / "in", tmp_path / "big", 1 << 30)

    def sides(training: TrainingConfig) -> tuple[np.ndarray, np.ndarray]:
        train = build_token_windows(training, data, TOKENIZER).tokens
        return np.asarray(train[:]), np.asarray(held_out_windows(training, data, TOKENIZER, 32).tokens[:])

    reference = sides(small)
    assert len(reference[1]) > 0
    for train, validation in (sides(big), sides(raw)):
        assert np.array_equal(train, reference[0]) and np.array_equal(validation, reference[1])


def _train(folder, overrides: list[str]) -> None:
    with Trainer(tiny_config(folder, *overrides), show_progress=False) as trainer:
        trainer.train()


def test_a_run_validates_on_the_held_out_documents_the_same_in_every_layout(tmp_path):
    """One process and FSDP over two: the same training losses and val_loss, from a raw jsonl source; and
    lockstep eval of the run finds the same held-out documents."""
    _corpus(tmp_path / "in")
    overrides = [
        "--training.dataset", "json", "--training.dataset_path", str(tmp_path / "in"), "--model.tokenizer", "bytes",
        "--data.cache_folder", str(tmp_path / "cache"), "--data.validation_fraction", "0.1",
        "--training.steps", "2", "--training.global_batch_size", "4", "--validation.enable",
        "--validation.freq", "2", "--validation.local_batch_size", "2", "--validation.global_batch_size", "4",
        "--debug.deterministic", "--checkpoint.enable",
    ]  # fmt: skip
    run_in_folder(_train, 1, tmp_path / "one", overrides)
    run_in_folder(_train, 2, tmp_path / "two", overrides)
    one, two = read_metrics(tmp_path / "one" / "run"), read_metrics(tmp_path / "two" / "run")
    view = [(r["step"], r["loss"], r.get("val_loss"), r.get("val_tokens")) for r in one]
    assert view == [(r["step"], r["loss"], r.get("val_loss"), r.get("val_tokens")) for r in two]
    assert one[-1]["val_tokens"] > 0
    (tmp_path / "scratch").mkdir()
    with Trainer(evaluation_config(tmp_path / "one" / "run", None, [], tmp_path / "scratch")) as trainer:
        assert trainer.validator.evaluate().as_record()["val_loss"] == one[-1]["val_loss"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--data.validation_fraction", "1.0"], r"must be in \(0, 1\)"),
        (["--data.validation_fraction", "-0.1"], r"must be in \(0, 1\)"),
        (["--data.validation_fraction", "0.1", "--validation.dataset", "json", "--validation.dataset_path", "v.jsonl"],
         "drop validation.dataset"),
        (["--data.validation_fraction", "0.1", "--training.dataset", "prepared", "--data.mixture", "a:1,b:1"],
         "give the mixture a validation set"),
    ],
    ids=["one", "negative", "with-a-validation-dataset", "with-a-mixture"],
)  # fmt: skip
def test_bad_fractions_are_refused_with_the_fix(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=r"data\.validation_fraction.*" + match):
        validate_job_config(tiny_config(tmp_path, "--validation.enable", *overrides), 1)


def test_a_fraction_replaces_validation_dataset_for_a_file_source(tmp_path):
    config = tiny_config(
        tmp_path, "--validation.enable", "--training.dataset", "json", "--training.dataset_path", "x.jsonl",
        "--data.validation_fraction", "0.01",
    )  # fmt: skip
    validate_job_config(config, 1)
