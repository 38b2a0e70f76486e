"""lockstep.data.provenance: the file, document and offset reported for a sample are where the loader's tokens
came from. Checked independently of the code under test: the documents are re-encoded from the texts written
here (BOS + UTF-8 bytes + EOS, the bytes tokenizer) and the reported document/offset must reproduce the
exact row the DataLoader serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lockstep.config.sections import DataConfig, TrainingConfig
from lockstep.data.auto_prepare import prepare_cached
from lockstep.data.dataset import TokenWindows, load_prepared_windows
from lockstep.data.loader import DataLoader, build_token_windows
from lockstep.data.mixture import load_mixture
from lockstep.data.prepare import prepare
from lockstep.data.prepared import read_manifest
from lockstep.data.provenance import SampleSource, sample_sources
from lockstep.data.shard_plan import plan_files
from lockstep.data.sources import file_source
from lockstep.data.tokenizer import BytesTokenizer

SEQ_LEN = 32
TOKENIZER = BytesTokenizer()


def _texts(tag: str, count: int) -> list[str]:
    """Documents of varied lengths (some shorter than a window, some spanning several), each naming itself."""
    return [f"{tag}{i} " + " ".join(f"w{tag}{i}x{k}" for k in range(i * 7 % 23)) for i in range(count)]


def _jsonl(path: Path, texts: list[str], blank_every: int = 0) -> None:
    """One record per line; a blank line after every `blank_every`-th record (the reader skips those)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, text in enumerate(texts):
        lines.append(json.dumps({"text": text}) + "\n")
        if blank_every and i % blank_every == blank_every - 1:
            lines.append("   \n")
    path.write_text("".join(lines))


def _encoded(texts: list[str]) -> list[int]:
    return [t for text in texts for t in (TOKENIZER.bos_id, *text.encode(), TOKENIZER.eos_id)]


def _check(found: SampleSource, row: list[int], files: dict[str, list[str]]) -> None:
    """The row served is token `offset` onwards of the reported document of the reported file, continued by
    the `documents - 1` documents after it in stream order (`files`: each file's texts, in stream order),
    and no fewer documents hold it."""
    texts = files[found.file]
    assert 0 <= found.document < len(texts) and found.offset >= 0
    stream = [t for file_texts in files.values() for t in file_texts]
    first = 0
    for path, file_texts in files.items():
        if path == found.file:
            break
        first += len(file_texts)
    chain = stream[first + found.document :]
    tokens = _encoded(chain[: found.documents])
    assert tokens[found.offset : found.offset + SEQ_LEN] == row
    assert len(_encoded(chain[: found.documents - 1])) < found.offset + SEQ_LEN + 1 <= len(tokens)
    assert found.preview == TOKENIZER.decode(row[:16])


def _served_and_found(windows, loader: DataLoader, steps: int) -> list[tuple[SampleSource, list[int]]]:
    """Each sample of the first `steps` steps: what provenance reports, and the inputs row the loader serves."""
    pairs = []
    for step in range(steps):
        start = step * loader.global_batch
        for j in range(loader.global_batch // loader.local_batch):
            first = start + j * loader.local_batch
            rows = loader.global_microbatch(start, j).inputs.tolist()
            found = sample_sources(windows, loader.order, range(first, first + len(rows)), TOKENIZER, 16)
            assert [f.sample for f in found] == list(range(first, first + len(rows)))
            pairs += zip(found, rows, strict=True)
    return pairs


def test_document_and_offset_reproduce_the_served_rows(tmp_path):
    """Training on a jsonl file (prepared into the cache the normal way): every sample of the first epoch is
    traced to its file, its document (counted without the blank lines; an empty text counts) and offset."""
    texts = _texts("d", 60)
    texts[5] = ""
    file = tmp_path / "in" / "docs.jsonl"
    _jsonl(file, texts, blank_every=4)
    training = TrainingConfig(dataset="json", dataset_path=str(file), seq_len=SEQ_LEN)
    windows = build_token_windows(training, DataConfig(cache_folder=str(tmp_path / "cache")), TOKENIZER)
    loader = DataLoader(windows, seed=11, global_batch=8, local_batch=4)
    pairs = _served_and_found(windows, loader, windows.num_windows // 8)
    path = str(file.resolve())
    for found, row in pairs:
        assert found.source == "json" and found.file == path
        _check(found, row, {path: texts})
    assert len(pairs) >= 40
    assert any(f.offset > 0 for f, _ in pairs) and any(f.documents > 2 for f, _ in pairs)
    assert any(f.document > 4 for f, _ in pairs)  # past a blank line: the record index, not the line number


def test_files_cut_into_many_shards_are_named(tmp_path):
    """Two files cut into byte-range shards: each sample names its file, and the document number within it
    counts the documents of that file's earlier shards."""
    folder = tmp_path / "in"
    texts = {"a.jsonl": _texts("a", 50), "b.jsonl": _texts("b", 40)}
    for name, file_texts in texts.items():
        _jsonl(folder / name, file_texts)
    out, _ = prepare_cached(
        file_source("json", str(folder), "text"), TOKENIZER, str(tmp_path / "cache"), shard_bytes=400
    )
    manifest = read_manifest(out)
    assert min(sum(s["file"] == f for s in manifest["shards"]) for f in (0, 1)) >= 3
    windows = load_prepared_windows(out, TOKENIZER, SEQ_LEN)
    loader = DataLoader(windows, seed=5, global_batch=8, local_batch=8)
    pairs = _served_and_found(windows, loader, windows.num_windows // 8)
    by_path = {str((folder / name).resolve()): file_texts for name, file_texts in texts.items()}
    for found, row in pairs:
        _check(found, row, by_path)
    assert {Path(f.file).name for f, _ in pairs} == {"a.jsonl", "b.jsonl"}
    assert any(f.document > 20 and f.file.endswith("b.jsonl") for f, _ in pairs)


def test_files_under_a_subfolder_of_the_prepared_location(tmp_path):
    """``lockstep data prepare --dataset-path ROOT`` records ROOT, while the names are relative to the folder
    the files share (ROOT/sub): the path is still the file's."""
    root = tmp_path / "root"
    texts = {"x.jsonl": _texts("x", 12), "y.jsonl": _texts("y", 12)}
    for name, file_texts in texts.items():
        _jsonl(root / "sub" / name, file_texts)
    source, tasks = plan_files(file_source("json", str(root), "text"))
    prepare(source, tasks, str(root), TOKENIZER, tmp_path / "out", show_progress=False, log=lambda line: None)
    windows = load_prepared_windows(tmp_path / "out", TOKENIZER, SEQ_LEN)
    loader = DataLoader(windows, seed=1, global_batch=4, local_batch=4)
    pairs = _served_and_found(windows, loader, windows.num_windows // 4)
    by_path = {str((root / "sub" / name).resolve()): file_texts for name, file_texts in texts.items()}
    for found, row in pairs:
        _check(found, row, by_path)
    assert {Path(f.file).name for f, _ in pairs} == set(texts)


def test_a_mixture_names_the_source_of_each_sample(tmp_path):
    """Two prepared folders whose documents use disjoint letters: the source named is the one whose
    letters the served row holds, and its file and document reproduce the row."""
    texts = {"alpha": [" ".join("a" * (1 + (i * k) % 5) for k in range(i % 13)) for i in range(30)]}
    texts["beta"] = [" ".join("b" * (1 + (i * k) % 4) for k in range(i % 9)) for i in range(45)]
    entries, files = [], {}
    for name, source_texts in texts.items():
        file = tmp_path / "raw" / name / "docs.jsonl"
        _jsonl(file, source_texts)
        source, tasks = plan_files(file_source("json", str(file.parent), "text"), 1 << 20)
        prepare(source, tasks, str(file.parent), TOKENIZER, tmp_path / name, show_progress=False, log=lambda line: None)
        entries.append(f"{tmp_path / name}:{1 if name == 'alpha' else 3}")
        files[name] = str(file.resolve())
    windows = load_mixture(entries, TOKENIZER, SEQ_LEN)
    loader = DataLoader(windows, seed=2, global_batch=8, local_batch=4)
    pairs = _served_and_found(windows, loader, 4)
    for found, row in pairs:
        letters = {chr(t) for t in row if t < 256} - {" "}
        assert letters == {found.source[0]} and found.file == files[found.source]
        _check(found, row, {files[found.source]: texts[found.source]})
    assert {f.source for f, _ in pairs} == {"alpha", "beta"}


def test_windows_of_unknown_origin_are_reported_not_refused():
    """Tokens made in memory: no file or document, the documents counted from the BOS ids."""
    stream = np.array(_encoded(["hello", "a longer document than one window of tokens", "x"]), np.uint16)
    windows = TokenWindows(stream, 8, TOKENIZER.bos_id, TOKENIZER.eos_id, "test")
    order = DataLoader(windows, seed=0, global_batch=1, local_batch=1).order
    found = sample_sources(windows, order, range(windows.num_windows), TOKENIZER, preview_tokens=4)
    assert all(f.file == "" and f.document == -1 and f.offset == -1 and f.source == "" for f in found)
    by_window = {f.window: f for f in found}
    assert by_window[0].documents == 2 and by_window[0].preview == "hel"
    assert by_window[1].documents == 1
