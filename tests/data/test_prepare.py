"""``lockstep data prepare/finalize/verify`` and training on a prepared folder, on small generated inputs."""

import json
import multiprocessing
import random

import numpy as np
import pytest

from lockstep.cli import main
from lockstep.data import shard_writer
from lockstep.data.finalize import finalize, verify
from lockstep.data.prepare import prepare
from lockstep.data.prepared import read_manifest
from lockstep.data.shard_plan import plan_files
from lockstep.data.sources import file_source
from lockstep.data.tokenizer import BytesTokenizer
from lockstep.errors import InputError
from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.data.ranks import auto_prepare_rank
from tests.helpers import tiny_config

WORDS = "the of and to in is was for on that with as by at from his her it an be this which or are é 語".split()


def _documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) for _ in range(count)]


def _jsonl(path, documents) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)))


def _corpus(folder):
    """Three jsonl files (one large enough to be cut into byte ranges) and their documents in order."""
    documents = _documents(900)
    _jsonl(folder / "a.jsonl", documents[:600])
    _jsonl(folder / "b.jsonl", documents[600:650])
    _jsonl(folder / "c" / "d.jsonl", documents[650:])
    return documents


def _prepare(folder, out, shard_bytes=1 << 20, tokenizer=None, **options):
    source, tasks = plan_files(file_source("json", str(folder), "text"), shard_bytes)
    kwargs = {"show_progress": False, "log": lambda line: None} | options
    return prepare(source, tasks, str(folder), tokenizer or BytesTokenizer(), out, **kwargs)


def _stream(out) -> tuple[np.ndarray, list[int]]:
    """The prepared token stream and every document's start in it."""
    manifest = read_manifest(out)
    tokens, starts, offset = [], [], 0
    for shard in manifest["shards"]:
        tokens.append(np.fromfile(out / "shards" / f"{shard['name']}.tokens", dtype=manifest["dtype"]))
        starts += (np.fromfile(out / "shards" / f"{shard['name']}.docs", dtype=np.uint64) + offset).tolist()
        offset += shard["tokens"]
    return np.concatenate(tokens), starts


def _expected(documents) -> tuple[np.ndarray, list[int]]:
    ids = [[256, *d.encode(), 257] for d in documents]
    return np.array([t for doc in ids for t in doc]), np.cumsum([0] + [len(d) for d in ids[:-1]]).tolist()


def test_sharding_by_file_and_byte_range_gives_the_one_worker_stream(tmp_path):
    """Byte ranges of a.jsonl (cut at line ends) in 2 worker processes, and the whole files inline, give the
    stream and document index of encoding every document in order; the fingerprint names the content."""
    documents = _corpus(tmp_path / "in")
    ranged = _prepare(tmp_path / "in", tmp_path / "ranged", shard_bytes=8 << 10, workers=2, tokenizer_threads=1)
    whole = _prepare(tmp_path / "in", tmp_path / "whole", shard_bytes=1 << 30)
    assert ranged.shards_total > 5 and whole.shards_total == 3 and ranged.workers == 2
    expected_tokens, expected_starts = _expected(documents)
    for out in (tmp_path / "ranged", tmp_path / "whole"):
        tokens, starts = _stream(out)
        assert np.array_equal(tokens, expected_tokens) and starts == expected_starts
        assert read_manifest(out)["num_documents"] == len(documents)
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps({"text": "changed"}) + "\n")
    changed = _prepare(tmp_path / "in", tmp_path / "changed", shard_bytes=1 << 30)
    assert read_manifest(changed.folder)["fingerprint"] != read_manifest(tmp_path / "whole")["fingerprint"]


def test_two_jobs_then_finalize_equal_one_job(tmp_path):
    _corpus(tmp_path / "in")
    one = _prepare(tmp_path / "in", tmp_path / "one", shard_bytes=16 << 10)
    first = _prepare(tmp_path / "in", tmp_path / "two", shard_bytes=16 << 10, num_jobs=2, job_index=0)
    assert first.status.startswith("job 0 of 2 done") and not (tmp_path / "two" / "manifest.json").exists()
    with pytest.raises(InputError, match=r"shards are not prepared yet: 00001, 00003"):
        finalize(tmp_path / "two")
    _prepare(tmp_path / "in", tmp_path / "two", shard_bytes=16 << 10, num_jobs=2, job_index=1)
    assert main(["data", "finalize", str(tmp_path / "two")]) == 0
    assert read_manifest(tmp_path / "two") == read_manifest(one.folder)


def test_rerun_is_a_no_op_and_other_content_is_refused(tmp_path, capsys):
    _corpus(tmp_path / "in")
    args = ["data", "prepare", "--dataset", "json", "--dataset-path", str(tmp_path / "in"), "--tokenizer", "bytes"]
    assert main([*args, "--out", str(tmp_path / "out"), "--shard-mb", "0.02"]) == 0
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    assert main([*args, "--out", str(tmp_path / "out"), "--shard-mb", "0.02"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == files  # nothing rewritten
    assert main([*args[:-1], "builtin", "--out", str(tmp_path / "out"), "--shard-mb", "0.02"]) == 2
    assert "holds a preparation of another tokenizer" in capsys.readouterr().err
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps({"text": "changed"}) + "\n")
    assert main([*args, "--out", str(tmp_path / "out"), "--shard-mb", "0.02"]) == 2
    assert "holds a preparation of other inputs" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main([*args, "--out", str(tmp_path / "mine")]) == 2
    assert "is not empty and holds no lockstep preparation" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == files


def test_interrupted_preparation_resumes_and_its_manifest_is_true(tmp_path, monkeypatch):
    """Ctrl-C during the third shard, then what a killed writer leaves (a shard without its record, a
    temp file): the next run keeps the finished shards, rewrites the rest and removes the leftovers."""
    documents = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    seen, calls = [], []
    encode = shard_writer._encode

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(*args)

    monkeypatch.setattr(shard_writer, "_encode", interrupting)
    with pytest.raises(KeyboardInterrupt):
        _prepare(tmp_path / "in", out, shard_bytes=16 << 10, workers=1)
    monkeypatch.setattr(shard_writer, "_encode", encode)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "shards").glob("*.json")) == ["00000.json", "00001.json"]
    assert not list((out / "shards").glob("*.tmp*"))  # the interrupted shard's partial file is gone
    (out / "shards" / "00001.json").unlink()  # as if killed between the rename and the record
    (out / "shards" / "00002.tokens.tmp4242").write_bytes(b"partial")  # as if killed while writing
    first_shard = (out / "shards" / "00000.tokens").stat().st_mtime_ns
    result = _prepare(tmp_path / "in", out, shard_bytes=16 << 10, log=seen.append)
    assert result.status == "prepared" and result.shards_written == result.shards_total - 1
    assert (out / "shards" / "00000.tokens").stat().st_mtime_ns == first_shard
    assert any("removed 1 partial files" in line for line in seen)
    assert not list((out / "shards").glob("*.tmp*")) and verify(out) == []
    assert np.array_equal(_stream(out)[0], _expected(documents)[0])


def test_train_on_a_prepared_folder_equals_training_on_its_files(tmp_path, capsys):
    """prepare -> train 3 steps: the same fingerprint and bitwise the same losses as on the jsonl itself."""
    _corpus(tmp_path / "in")
    out = tmp_path / "prepared"
    assert (
        main(["data", "prepare", "--dataset", "json", "--dataset-path", str(tmp_path / "in"), "--out", str(out)]) == 0
    )
    runs = {}
    for name, kind, path in (("prepared", "prepared", out), ("files", "json", tmp_path / "in")):
        config = tiny_config(
            tmp_path / name, "--training.dataset", kind, "--training.dataset_path", str(path), "--training.steps", "3"
        )
        trainer = Trainer(config, show_progress=False)
        runs[name] = (trainer.loader.windows.fingerprint, [m["loss"] for m in read_metrics(trainer.train())])
    assert len(runs["prepared"][1]) == 3 and runs["prepared"] == runs["files"]
    assert runs["prepared"][0] == read_manifest(out)["fingerprint"]


def test_two_local_ranks_prepare_the_cache_once(tmp_path):
    """Two processes start auto-preparation of the same files at once: one tokenizes, the other waits
    for it and uses its folder."""
    _corpus(tmp_path / "in")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    ranks = [
        context.Process(
            target=auto_prepare_rank, args=(barrier, str(tmp_path / "in"), str(tmp_path / "cache"), results)
        )
        for _ in range(2)
    ]
    for rank in ranks:
        rank.start()
    prepared_here = sorted(results.get(timeout=120) for _ in ranks)
    for rank in ranks:
        rank.join()
    assert prepared_here == [False, True]
    assert len(list((tmp_path / "cache" / "prepared").glob("*/manifest.json"))) == 1


def test_a_hugging_face_dataset_folder_gives_the_json_stream(tmp_path, monkeypatch):
    """--dataset hf reads a local folder through datasets.load_dataset (offline), cut into row ranges."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    documents = _documents(300)
    _jsonl(tmp_path / "in" / "train.jsonl", documents)
    args = ["data", "prepare", "--dataset", "hf", "--dataset-path", str(tmp_path / "in"), "--tokenizer", "bytes"]
    assert main([*args, "--out", str(tmp_path / "out"), "--shard-mb", "0.01"]) == 0
    assert len(read_manifest(tmp_path / "out")["shards"]) > 1
    assert np.array_equal(_stream(tmp_path / "out")[0], _expected(documents)[0])


def test_a_second_identical_prepare_into_one_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two identical prepares at once used to write the same shards, and one's finalize deleted the other's
    in-flight file. The job's OS lock (held here, as a running prepare holds it) refuses the second in
    one line; the first's finished shards are untouched."""
    from lockstep.data.prepare import _job_lock

    _corpus(tmp_path / "in")
    out = tmp_path / "prepared"
    out.mkdir()
    argv = ["data", "prepare", "--dataset", "json", "--dataset-path", str(tmp_path / "in"), "--out", str(out)]
    with _job_lock(out, 0, 1):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is being prepared by another lockstep data prepare (job 0 of 1, pid" in err
    assert main(argv) == 0  # once the first is gone, the folder is prepared as usual
