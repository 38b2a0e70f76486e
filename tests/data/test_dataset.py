"""lockstep.data.dataset: documents become BOS + tokens + EOS in one stream whose windows give inputs and
shifted labels (BOS ignored), from every kind of user file; a prepared folder is refused when its
tokenizer or a token id does not fit the run's tokenizer, in one line naming the fix."""

import json

import numpy as np
import pytest

from lockstep.cli import main
from lockstep.config.sections import DataConfig, ModelConfig, TrainingConfig
from lockstep.data.dataset import IGNORE_INDEX
from lockstep.data.loader import build_token_windows
from lockstep.data.prepared import read_manifest
from lockstep.data.tokenizer import BytesTokenizer, HFTokenizer, build_tokenizer
from lockstep.errors import InputError
from tests.data.test_prepare import _corpus, _prepare
from tests.helpers import tiny_overrides


def test_windows_labels_shifted_and_bos_ignored():
    tokenizer = build_tokenizer(ModelConfig(), DataConfig())
    windows = build_token_windows(TrainingConfig(seq_len=64), DataConfig(), tokenizer)
    inputs, labels = windows.batch([0, 1])
    raw = windows.window(0)
    assert inputs[0].tolist() == raw[:-1].tolist()
    assert raw[0] == tokenizer.bos_id
    expected = [IGNORE_INDEX if t == tokenizer.bos_id else int(t) for t in raw[1:]]
    assert labels[0].tolist() == expected


@pytest.mark.parametrize("kind", ["text", "json", "parquet"])
def test_user_datasets(tmp_path, kind):
    documents = [f"document number {i} " * 5 for i in range(20)]
    if kind == "text":
        folder = tmp_path / "texts"
        folder.mkdir()
        for i, d in enumerate(documents):
            (folder / f"{i:02d}.txt").write_text(d)
        path = folder
    elif kind == "json":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "data.parquet"
        pq.write_table(pa.table({"text": documents}), path)
    tokenizer = BytesTokenizer()
    training = TrainingConfig(dataset=kind, dataset_path=str(path), seq_len=32)
    windows = build_token_windows(training, DataConfig(cache_folder=str(tmp_path / "cache")), tokenizer)
    expected_len = sum(len(d.encode()) + 2 for d in documents)
    assert len(windows.tokens) == expected_len
    assert windows.tokens[0] == tokenizer.bos_id
    assert bytes(windows.tokens[1 : 1 + len(documents[0])].tolist()).decode() == documents[0]
    assert windows.num_windows == expected_len // 33


def test_a_token_id_above_the_vocabulary_is_refused_in_one_line_naming_the_shard(tmp_path, capsys):
    """A shard altered after preparing (same size, so the start-up size check passes) used to crash
    training with an IndexError in the embedding."""
    _corpus(tmp_path / "in")
    out = tmp_path / "prepared"
    assert (
        main(["data", "prepare", "--dataset", "json", "--dataset-path", str(tmp_path / "in"), "--out", str(out)]) == 0
    )
    manifest = read_manifest(out)
    shards = [out / "shards" / f"{shard['name']}.tokens" for shard in manifest["shards"]]
    for shard in shards:  # every 16th token: any window of the run meets one
        tokens = np.fromfile(shard, dtype=np.dtype(manifest["dtype"]))
        tokens[::16] = np.iinfo(tokens.dtype).max
        tokens.tofile(shard)
    capsys.readouterr()
    argv = ["train", "--config", "llama3_debug", *tiny_overrides(tmp_path / "run"), "--training.dataset", "prepared",
            "--training.dataset_path", str(out), "--training.steps", "2"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert any(str(shard) in err for shard in shards)
    assert "at or above the vocabulary size" in err and "lockstep data verify" in err


def test_a_prepared_folder_refuses_another_tokenizer(tmp_path, shared_tokenizer):
    _corpus(tmp_path / "in")
    out = _prepare(tmp_path / "in", tmp_path / "out", tokenizer=HFTokenizer(shared_tokenizer)).folder
    assert (out / "tokenizer.json").read_bytes() == shared_tokenizer.read_bytes()
    training = TrainingConfig(dataset="prepared", dataset_path=str(out), seq_len=32)
    with pytest.raises(InputError, match=rf"prepared with another tokenizer.*--model.tokenizer_path {out}$"):
        build_token_windows(training, DataConfig(), BytesTokenizer())
    windows = build_token_windows(training, DataConfig(), HFTokenizer(out))  # the folder's own tokenizer
    assert windows.num_windows == read_manifest(out)["num_tokens"] // 33
