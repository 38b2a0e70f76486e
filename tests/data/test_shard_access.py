"""A rank of a 64-rank job touches only its own share of a prepared folder: start-up reads the manifest
and opens no shard; a step opens only the shards its own samples (and the next step's, read ahead) lie
in; the step's valid-token count reads no other rank's document index. Counted with the audit-hook file
counter, not timed."""

import numpy as np
import pytest

from lockstep.config.sections import DataConfig, TrainingConfig
from lockstep.data.dataset import load_prepared_windows
from lockstep.data.loader import DataLoader, build_token_windows, placement
from lockstep.data.tokenizer import BytesTokenizer
from lockstep.errors import InputError
from lockstep.tools.scale.io_counter import counting_file_ops
from tests.data.test_prepare import _corpus, _prepare

WORLD, LOCAL_BATCH, SEQ_LEN = 64, 2, 32


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


def test_own_counts_summed_over_ranks_equal_the_whole_steps_count(tmp_path):
    """What each rank counts of its own samples, summed over the 64 ranks, is the count of the whole step
    (the loss denominator is unchanged, bitwise)."""
    _corpus(tmp_path / "in")
    _prepare(tmp_path / "in", tmp_path / "out", shard_bytes=4096)
    windows = load_prepared_windows(tmp_path / "out", BytesTokenizer(), SEQ_LEN)
    whole = DataLoader(windows, seed=3, global_batch=WORLD * LOCAL_BATCH, local_batch=LOCAL_BATCH)
    expected = [whole.next_step(0, WORLD)[1] for _ in range(3)]
    counts = []
    for rank in range(WORLD):
        loader = DataLoader(windows, seed=3, global_batch=WORLD * LOCAL_BATCH, local_batch=LOCAL_BATCH)
        loader.sum_over_ranks = lambda own: own
        counts.append([loader.next_step(rank, WORLD)[1] for _ in range(3)])
    assert [sum(c[step] for c in counts) for step in range(3)] == expected
    assert all(0 < c[0] < expected[0] for c in counts)


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


def test_a_multi_node_job_never_tokenizes_raw_files_at_start_up(tmp_path):
    """Raw json on a 2-node job with no cache entry is one line with the prepare command, before any process
    group; on one node it is prepared into the cache (under the machine lock), and then 2 nodes use it."""
    _corpus(tmp_path / "in")
    training = TrainingConfig(dataset="json", dataset_path=str(tmp_path / "in"), seq_len=SEQ_LEN)
    data = DataConfig(cache_folder=str(tmp_path / "cache"))
    with pytest.raises(InputError, match="spans 2 nodes.*lockstep data prepare --dataset json"):
        build_token_windows(training, data, BytesTokenizer(), nodes=2)
    assert not (tmp_path / "cache" / "prepared").exists()
    one = build_token_windows(training, data, BytesTokenizer(), nodes=1)
    assert build_token_windows(training, data, BytesTokenizer(), nodes=2).fingerprint == one.fingerprint
