"""Data mixtures (data.mixture): exact interleaving, a pure function of (seed, g), per-source epochs,
resume, per-source token counts, a tiny training run, and bad configs refused in one line.

Each source is a tiny prepared folder whose documents use one letter only (alpha: 'a', beta: 'b',
gamma: 'c'), so the source of every served row can be read off its tokens, independently of the code
under test."""

from __future__ import annotations

import json
import math
import random
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from lockstep.cli import main
from lockstep.config import load_config
from lockstep.data.dataset import IGNORE_INDEX
from lockstep.data.loader import DataLoader, placement
from lockstep.data.mixture import load_mixture, mixture_fingerprint
from lockstep.data.prepare import prepare
from lockstep.data.prepared import read_manifest
from lockstep.data.shard_plan import plan_files
from lockstep.data.sources import file_source
from lockstep.data.tokenizer import BytesTokenizer
from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.helpers import tiny_overrides

SEQ_LEN = 16
LETTERS = {"alpha": "a", "beta": "b", "gamma": "c"}
DOCUMENTS = {"alpha": 20, "beta": 50, "gamma": 30}


def _source(root: Path, name: str) -> Path:
    """A prepared folder `root/name` of documents made of LETTERS[name] only (bytes tokenizer)."""
    rng = random.Random(name)
    letter = LETTERS[name]
    texts = [" ".join(letter * rng.randint(1, 6) for _ in range(rng.randint(2, 30))) for _ in range(DOCUMENTS[name])]
    raw = root / "raw" / name
    raw.mkdir(parents=True)
    (raw / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    source, tasks = plan_files(file_source("json", str(raw), "text"), 1 << 20)
    prepare(source, tasks, str(raw), BytesTokenizer(), root / name, show_progress=False, log=lambda line: None)
    return root / name


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixture")
    return {name: _source(root, name) for name in LETTERS}


def _mixture(sources: dict[str, Path], weights: dict[str, str], seq_len: int = SEQ_LEN):
    return load_mixture([f"{sources[n]}:{w}" for n, w in weights.items()], BytesTokenizer(), seq_len)


def _row_sources(inputs: torch.Tensor) -> list[str]:
    """The source of each row, read from its letters (each source's documents use one letter)."""
    found = []
    for row in inputs.tolist():
        names = [n for n, letter in LETTERS.items() if ord(letter) in row]
        assert len(names) == 1, row
        found.append(names[0])
    return found


def _served(loaders: list[DataLoader], steps: int, shard_degree: int = 1) -> list[torch.Tensor]:
    """The global batch of each step (inputs in global microbatch order), read by one loader per
    data-parallel rank (each reads only its own microbatches, see ``placement``)."""
    dp_degree = len(loaders)
    num_microbatches = loaders[0].global_batch // loaders[0].local_batch
    batches = []
    for _ in range(steps):
        by_index, totals = {}, set()
        for r, loader in enumerate(loaders):
            microbatches, total = loader.next_step(r, dp_degree, shard_degree)
            totals.add(total)
            by_index |= dict(zip(placement(num_microbatches, r, dp_degree, shard_degree), microbatches, strict=True))
        assert len(totals) == 1, "every rank must see the same global token count"
        batches.append(torch.cat([by_index[j].inputs for j in range(num_microbatches)]))
    return batches


@pytest.mark.parametrize(
    "weights, global_batch", [({"alpha": "0.7", "beta": "0.3"}, 4), ({"alpha": "1", "beta": "1", "gamma": "1"}, 6)]
)
def test_proportions_are_exact_over_every_window_of_ten_steps(sources, weights, global_batch):
    """The rows the loader serves (their source read from their letters): every window of 10 consecutive
    steps, wherever it starts, holds exactly 10 x global_batch x w_i rows of source i (10 x global_batch
    is a multiple of the period), and every window of 1-40 samples is within 2 of L w_i."""
    windows = _mixture(sources, weights)
    rows = [
        name
        for batch in _served([DataLoader(windows, seed=5, global_batch=global_batch, local_batch=2)], 60)
        for name in _row_sources(batch)
    ]
    per_step = [rows[s * global_batch : (s + 1) * global_batch] for s in range(60)]
    shares = dict(zip(windows.names, windows.shares, strict=True))
    for start in range(50):
        window = [name for step in per_step[start : start + 10] for name in step]
        assert {n: window.count(n) for n in shares} == {n: 10 * global_batch * s for n, s in shares.items()}
    for length in range(1, 41):
        for start in range(0, len(rows) - length, 7):
            window = rows[start : start + length]
            assert all(abs(window.count(n) - length * s) < 2 for n, s in shares.items()), (start, length)


def test_the_sample_of_g_is_a_pure_function_of_seed_and_g(sources):
    """The same global batches through 1, 2 or 4 ranks (with and without strided shards); window_of(g) asked
    alone, in reverse, or far out (g = 10^12) on a fresh order gives what one batched call gives; another
    seed changes windows but never the source of a sample."""
    windows = _mixture(sources, {"alpha": "0.7", "beta": "0.3"})
    reference = _served([DataLoader(windows, seed=3, global_batch=8, local_batch=2)], 6)
    for dp_degree, shard_degree in ((2, 1), (4, 1), (2, 2), (4, 2)):
        served = _served(
            [DataLoader(windows, seed=3, global_batch=8, local_batch=2) for _ in range(dp_degree)], 6, shard_degree
        )
        assert all(torch.equal(a, b) for a, b in zip(served, reference, strict=True)), (dp_degree, shard_degree)
    batched = windows.sample_order(3).windows_of(range(300))
    fresh = windows.sample_order(3)
    assert [fresh.window_of(g) for g in reversed(range(300))][::-1] == batched
    far = 10**12 + 17
    assert windows.sample_order(3).window_of(far) == fresh.windows_of([5, far, 9])[1]
    other_seed = windows.sample_order(4)
    assert other_seed.windows_of(range(300)) != batched
    assert (other_seed.locate(range(300))[0] == fresh.locate(range(300))[0]).all()


def test_each_source_is_visited_as_a_permutation_per_epoch_of_that_source(sources):
    """Source i's samples, in global order, cut into runs of its window count: each run is a permutation of
    its windows, and consecutive epochs (and the two sources' orders) differ."""
    windows = _mixture(sources, {"alpha": "0.7", "beta": "0.3"})
    located_sources, local = windows.sample_order(11).locate(range(2000))
    firsts = []
    for i, name in enumerate(windows.names):
        visits = local[located_sources == i].tolist()
        count = windows.sources[i].num_windows
        epochs = [visits[e * count : (e + 1) * count] for e in range(len(visits) // count)]
        assert len(epochs) >= 3, name
        assert all(sorted(epoch) == list(range(count)) for epoch in epochs), name
        assert epochs[0] != epochs[1] != epochs[2], name
        firsts.append(epochs[0])
    shortest = min(len(f) for f in firsts)
    assert firsts[0][:shortest] != firsts[1][:shortest]


def test_resume_in_another_layout_equals_an_uninterrupted_run(sources):
    """3 steps on one rank, then the state into 2 ranks' fresh loaders (fresh mixture objects): steps 4-8
    are bitwise those of an uninterrupted run, and so are the per-source token counts. A mixture with
    other weights refuses the state (fingerprint over all sources)."""
    weights = {"alpha": "0.7", "beta": "0.3"}
    expected = _served([DataLoader(_mixture(sources, weights), seed=9, global_batch=8, local_batch=2)], 8)
    first = DataLoader(_mixture(sources, weights), seed=9, global_batch=8, local_batch=2)
    _served([first], 3)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it
    assert state == {
        "next_sample_index": 24,
        "fingerprint": first.windows.fingerprint,
        "order_version": 2,
        "shuffle": True,
    }
    resumed = [DataLoader(_mixture(sources, weights), seed=9, global_batch=8, local_batch=2) for _ in range(2)]
    for loader in resumed:
        loader.load_state_dict(state)
    served = _served(resumed, 5)
    assert all(torch.equal(a, b) for a, b in zip(served, expected[3:], strict=True))
    reweighted = DataLoader(_mixture(sources, {"alpha": "0.6", "beta": "0.4"}), seed=9, global_batch=8, local_batch=2)
    with pytest.raises(ValueError, match="fingerprint differs"):
        reweighted.load_state_dict(state)


def test_source_tokens_count_the_consumed_steps_only(sources):
    """take_source_tokens after 2 steps is, per source, the number of labels that take a loss in the rows of
    that source (counted here from the served tensors); the step read ahead is not counted, and each call
    starts afresh. The global token count is their sum."""
    windows = _mixture(sources, {"alpha": "0.7", "beta": "0.2", "gamma": "0.1"})
    loader = DataLoader(windows, seed=2, global_batch=10, local_batch=5)

    def step_truth() -> tuple[dict[str, int], int]:
        truth = dict.fromkeys(windows.names, 0)
        microbatches, total = loader.next_step()
        for mb in microbatches:
            for name, labels in zip(_row_sources(mb.inputs), mb.labels, strict=True):
                truth[name] += int((labels != IGNORE_INDEX).sum())
        assert total == sum(truth.values())
        return truth, total

    first, second = step_truth()[0], step_truth()[0]
    assert loader.take_source_tokens() == {n: first[n] + second[n] for n in windows.names}
    assert loader.take_source_tokens() == {}
    assert loader.take_source_tokens() == {} and step_truth()[0] == loader.take_source_tokens()


def test_a_tiny_training_run_on_a_two_source_mixture(sources, tmp_path):
    """--training.dataset prepared --data.mixture A:0.7,B:0.3 (the CLI's comma form, no dataset_path): 3
    steps of the tiny Llama with finite losses, the mixture's fingerprint as the dataset's, and per-source
    tokens (logged as data/tokens/NAME once the trainer logs them, else still in the loader) equal to those
    of the same steps read by a loader of its own."""
    spec = f"{sources['alpha']}:0.7,{sources['beta']}:0.3"
    overrides = [*tiny_overrides(tmp_path), "--model.tokenizer", "bytes", "--training.steps", "3"]
    overrides += ["--training.dataset", "prepared", "--data.mixture", spec]
    config = load_config("llama3_debug", overrides)
    assert config.data.mixture == [f"{sources['alpha']}:0.7", f"{sources['beta']}:0.3"]
    trainer = Trainer(config, show_progress=False)
    records = read_metrics(trainer.train())
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    windows = _mixture(sources, {"alpha": "0.7", "beta": "0.3"}, seq_len=32)
    assert trainer.loader.windows.fingerprint == windows.fingerprint
    left = trainer.loader.take_source_tokens()
    got = {n: left.get(n, 0) + sum(r.get(f"data/tokens/{n}", 0) for r in records) for n in windows.names}
    own = DataLoader(windows, seed=trainer.seeds["data"], global_batch=trainer.global_batch, local_batch=2)
    for _ in range(3):
        own.next_step()
    assert got == own.take_source_tokens() and all(got.values())


def test_the_fingerprint_covers_every_source_and_ignores_the_entry_order(sources):
    """Sources are sorted by name (so the entry order changes nothing) and hashed with their normalised weight
    and manifest fingerprint; another source changes the fingerprint."""
    ab = _mixture(sources, {"alpha": "0.7", "beta": "0.3"})
    ba = _mixture(sources, {"beta": "0.3", "alpha": "0.7"})
    assert ab.fingerprint == ba.fingerprint and ab.names == ["alpha", "beta"]
    assert ab.summary() == "data mixture: alpha 0.7 (7 of every 10 samples), beta 0.3 (3 of every 10 samples)"
    assert ab.sample_order(1).windows_of(range(50)) == ba.sample_order(1).windows_of(range(50))
    manifests = [read_manifest(sources[n])["fingerprint"] for n in ("alpha", "beta")]
    assert ab.fingerprint == mixture_fingerprint(["alpha", "beta"], [Fraction(7, 10), Fraction(3, 10)], manifests)
    assert ab.fingerprint != _mixture(sources, {"alpha": "0.7", "gamma": "0.3"}).fingerprint


def _error_line(capsys, argv: list[str]) -> str:
    """``lockstep train ARGV``: exit 2 and exactly one error line, no traceback."""
    code = main(["train", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("lockstep train: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_mixtures_are_refused_in_one_line(sources, tmp_path, capsys):
    alpha, beta = sources["alpha"], sources["beta"]
    twin = tmp_path / "elsewhere" / "alpha"
    shutil.copytree(alpha, twin)
    retokenized = tmp_path / "retokenized"
    shutil.copytree(beta, retokenized)
    manifest = json.loads((retokenized / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "f" * 64
    (retokenized / "manifest.json").write_text(json.dumps(manifest))
    base = ["--config", "llama3_debug", *tiny_overrides(tmp_path), "--model.tokenizer", "bytes"]
    prepared = [*base, "--training.dataset", "prepared"]
    cases = [
        ([*prepared, "--data.mixture", f"{alpha},{beta}:0.3"], f"data.mixture: '{alpha}' has no weight; write FOLDER:WEIGHT, e.g. {alpha}:0.5"),
        ([*prepared, "--data.mixture", f"{alpha}:-0.7,{beta}:0.3"], "weight must be > 0"),
        ([*prepared, "--data.mixture", f"{alpha}:seven"], "weight 'seven' is not a number"),
        ([*prepared, "--data.mixture", f"{alpha}x:0.7"], f"no such folder {alpha}x; did you mean {alpha}?"),
        ([*prepared, "--data.mixture", f"{alpha}:0.5,{twin}:0.5"], "two sources are named 'alpha'"),
        ([*prepared, "--data.mixture", f"{alpha}:1e-7,{beta}:1"], "under the smallest share"),
        ([*prepared, "--data.mixture", f"{alpha}:1", "--training.dataset_path", str(beta)], "data.mixture: replaces training.dataset_path"),
        ([*base, "--training.dataset", "json", "--data.mixture", f"{alpha}:1"], "data.mixture: mixes prepared folders, but training.dataset = json; set --training.dataset prepared"),
        ([*base, "--data.mixture", f"{alpha}:1"], "training.dataset = builtin"),
        (prepared, "training.dataset_path: is required when training.dataset = prepared (or set data.mixture"),
        ([*prepared, "--data.mixture", f"{alpha}:0.5,{retokenized}:0.5"], "data.mixture: the sources were prepared with different tokenizers: alpha with"),
    ]  # fmt: skip
    for argv, fragment in cases:
        assert fragment in _error_line(capsys, argv), argv
