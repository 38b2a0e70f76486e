"""lockstep.data.prepared: a prepared folder's shards read back as one token array. Reads across shard
boundaries give what one array gives; a rank of a 64-rank job opens only the manifest at start-up and
then only the shards its own samples lie in (counted with the audit-hook file counter, not timed), so a
damaged shard is refused in one line when it is first mapped."""

import numpy as np
import pytest

from lockstep.config.sections import DataConfig, TrainingConfig
from lockstep.data.dataset import load_prepared_windows
from lockstep.data.loader import DataLoader, build_token_windows, placement
from lockstep.data.tokenizer import BytesTokenizer
from lockstep.errors import InputError
from lockstep.tools.scale.io_counter import counting_file_ops
from tests.data.test_prepare import _corpus, _expected, _prepare

WORLD, LOCAL_BATCH, SEQ_LEN = 64, 2, 32


def test_windows_cross_shard_boundaries_like_one_array(tmp_path):
    """Slices, single tokens and gathered positions over many small shards read what one array gives."""
    documents = _corpus(tmp_path / "in")
    out = _prepare(tmp_path / "in", tmp_path / "out", shard_bytes=4 << 10).folder
    training = TrainingConfig(dataset="prepared", dataset_path=str(out), seq_len=50)
    windows = build_token_windows(training, DataConfig(), BytesTokenizer())
    reference = _expected(documents)[0]
    assert len(windows.tokens) == len(reference)
    for w in range(windows.num_windows):
        assert np.array_equal(windows.window(w), reference[w * 51 : (w + 1) * 51])
    positions = np.random.default_rng(0).integers(0, len(reference), 500)
    assert np.array_equal(windows.tokens[positions], reference[positions]) and windows.tokens[-1] == 257


def _shards_of(windows, loader: DataLoader, samples: list[int]) -> set[str]:
    """The token and document-index files that hold these samples' windows."""
    span, tokens = SEQ_LEN + 1, windows.tokens
    files = set()
    for window in loader.order.windows_of(samples):
        first = int(np.searchsorted(tokens.offsets, window * span, side="right")) - 1
        last = int(np.searchsorted(tokens.offsets, (window + 1) * span - 1, side="right")) - 1
        for index in range(first, last + 1):
            files |= {str(tokens.paths[index]), str(tokens.paths[index].with_suffix(".docs"))}
    return files


def _own_samples(step: int, rank: int) -> list[int]:
    start = step * WORLD * LOCAL_BATCH
    return [start + j * LOCAL_BATCH + i for j in placement(WORLD, rank, WORLD) for i in range(LOCAL_BATCH)]


def test_a_rank_of_64_opens_only_the_shards_of_its_own_samples(tmp_path):
    _corpus(tmp_path / "in")
    _prepare(tmp_path / "in", tmp_path / "out", shard_bytes=4096)
    shards = tmp_path / "out" / "shards"
    assert len(list(shards.glob("*.tokens"))) >= 48
    rank = 37
    with counting_file_ops() as start_up:
        windows = load_prepared_windows(tmp_path / "out", BytesTokenizer(), SEQ_LEN)
        loader = DataLoader(windows, seed=3, global_batch=WORLD * LOCAL_BATCH, local_batch=LOCAL_BATCH)
        loader.sum_over_ranks = lambda counts: counts  # one rank of the job: the all-reduce is not the point
    assert start_up.opened_under(shards) == set() and start_up.maps == 0
    assert start_up.opens[str((tmp_path / "out" / "manifest.json").resolve())] == 1
    everything = set()
    for step in range(3):
        with counting_file_ops() as ops:
            microbatches, _ = loader.next_step(rank, WORLD)
            loader._ahead[1].result()  # the next step's read-ahead counts too: it is this rank's own
        allowed = _shards_of(windows, loader, _own_samples(step, rank) + _own_samples(step + 1, rank))
        assert ops.opened_under(shards) <= allowed, step
        assert ops.listings == 0
        everything |= ops.opened_under(shards)
        assert len(microbatches) == 1
    all_files = {str(p.resolve()) for p in shards.iterdir() if p.suffix in (".tokens", ".docs")}
    assert len(everything) < len(all_files) // 4  # the other 63 ranks' shards stay closed


def test_a_damaged_shard_is_refused_in_one_line_when_a_rank_first_reads_it(tmp_path):
    """Start-up no longer stats every shard, so a shard cut short (or replaced by a link) is refused when
    it is first mapped, naming the file and `lockstep data verify`; the other shards still read."""
    _corpus(tmp_path / "in")
    _prepare(tmp_path / "in", tmp_path / "out", shard_bytes=4096)
    shards = tmp_path / "out" / "shards"
    truncated, linked = shards / "00003.tokens", shards / "00005.tokens"
    truncated.write_bytes(truncated.read_bytes()[:-3])
    (tmp_path / "elsewhere").write_bytes(linked.read_bytes())
    linked.unlink()
    linked.symlink_to(tmp_path / "elsewhere")
    tokens = load_prepared_windows(tmp_path / "out", BytesTokenizer(), SEQ_LEN).tokens
    assert len(tokens[int(tokens.offsets[4]) : int(tokens.offsets[4]) + 10]) == 10
    with pytest.raises(InputError, match=r"00003.tokens: the manifest records \d+ bytes but it has .*data verify"):
        tokens[int(tokens.offsets[3])]
    with pytest.raises(InputError, match="00005.tokens: is not a plain file"):
        tokens[int(tokens.offsets[5])]
