"""lockstep.data.loader: a step's samples, and its valid-token count, do not depend on how the ranks
split it; the placement of microbatches over replicas and shards; the loader's state resumes exactly and
refuses another dataset or shuffle setting; a multi-node job never tokenizes raw files at start-up."""

import numpy as np
import pytest
import torch

from lockstep.config.sections import DataConfig, ModelConfig, TrainingConfig
from lockstep.data.dataset import load_prepared_windows
from lockstep.data.loader import DataLoader, build_token_windows, placement
from lockstep.data.tokenizer import BytesTokenizer, build_tokenizer
from lockstep.errors import InputError
from tests.data.test_prepare import _corpus, _prepare

WORLD, LOCAL_BATCH, SEQ_LEN = 64, 2, 32


def _loader(local_batch: int, seq_len: int = 16, shuffle: bool = True) -> DataLoader:
    tokenizer = build_tokenizer(ModelConfig(), DataConfig())
    windows = build_token_windows(TrainingConfig(seq_len=seq_len), DataConfig(), tokenizer)
    return DataLoader(windows, seed=11, global_batch=8, local_batch=local_batch, shuffle=shuffle)


@pytest.mark.parametrize("dp_degree, local_batch", [(1, 2), (2, 2), (4, 2), (2, 4), (4, 1)])
def test_step_samples_do_not_depend_on_rank_layout(dp_degree, local_batch):
    reference = _loader(local_batch=8)
    loader = _loader(local_batch)
    for _ in range(3):
        (whole,), tokens = reference.next_step()
        rank_batches = []
        for rank in range(dp_degree):
            loader.next_sample_index = reference.next_sample_index - 8
            microbatches, rank_tokens = loader.next_step(rank, dp_degree)
            assert rank_tokens == tokens  # every rank knows the global denominator
            rank_batches.append(microbatches)
        # rank r holds the r-th contiguous block of microbatches
        ordered = [m for batches in rank_batches for m in batches]
        assert np.array_equal(np.concatenate([m.inputs for m in ordered]), whole.inputs)
        assert np.array_equal(np.concatenate([m.labels for m in ordered]), whole.labels)


def test_valid_token_count_and_read_ahead_match_reading_every_sample():
    """The denominator counted from token ids equals the count over every sample's labels (documents
    starting inside windows included), and what the background thread read ahead is what a fresh read
    gives."""
    loader, ignored = _loader(2, seq_len=256), 0
    for _ in range(30):
        start = loader.next_sample_index
        microbatches, tokens = loader.next_step(1, 2)
        everything = [loader.global_microbatch(start, k) for k in range(4)]
        assert tokens == sum(m.num_valid_tokens for m in everything)
        assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(microbatches, everything[2:], strict=True))
        ignored += 8 * 256 - tokens
    assert ignored > 0  # some labels were BOS, so the count was tested
    assert loader._ahead is not None and loader._ahead[0][0] == loader.next_sample_index
    assert loader.take_wait_s() >= 0 and loader.take_wait_s() == 0


def test_placement_strides_over_the_shards_of_each_replica():
    """HSDP 2x2: each replica holds a contiguous half, its 2 shard ranks alternate inside it, so every
    micro-step's reduce-scatter sums an aligned pair; without sharding, contiguous blocks."""
    assert [placement(8, rank, 4, shard_degree=2) for rank in range(4)] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert [placement(8, rank, 2) for rank in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    loader, reference = _loader(2), _loader(2)
    (whole, tokens), (strided, rank_tokens) = reference.next_step(), loader.next_step(1, 2, shard_degree=2)
    assert rank_tokens == tokens
    assert [m.inputs.tolist() for m in strided] == [whole[1].inputs.tolist(), whole[3].inputs.tolist()]


def test_loader_state_round_trip_and_fingerprint_check():
    loader = _loader(2)
    loader.next_step()
    state = loader.state_dict()
    resumed = _loader(2)
    resumed.load_state_dict(state)
    assert [m.inputs.tolist() for m in resumed.next_step()[0]] == [m.inputs.tolist() for m in loader.next_step()[0]]
    with pytest.raises(ValueError, match="fingerprint"):
        resumed.load_state_dict({**state, "fingerprint": "other"})


@pytest.mark.parametrize("dp_degree", [1, 2, 4])
def test_unshuffled_steps_are_the_same_in_every_layout_and_a_resume_keeps_the_setting(dp_degree):
    """data.shuffle = false: each step reads the next windows in order, whichever ranks read them; a
    checkpoint of one setting is refused by a run of the other."""
    reference, loader = _loader(8, shuffle=False), _loader(8 // dp_degree, shuffle=False)
    (whole,), _ = reference.next_step()
    parts = []
    for rank in range(dp_degree):
        loader.next_sample_index = 0
        parts += loader.next_step(rank, dp_degree)[0]
    assert np.array_equal(np.concatenate([m.inputs for m in parts]), whole.inputs)
    assert np.array_equal(whole.inputs, reference.windows.batch(list(range(8)))[0])
    with pytest.raises(ValueError, match="data.shuffle = False, this run has True"):
        _loader(2).load_state_dict(reference.state_dict())


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
