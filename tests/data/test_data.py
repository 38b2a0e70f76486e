import json

import numpy as np
import pytest
import torch

from lockstep.config.sections import DataConfig, ModelConfig, TrainingConfig
from lockstep.data.corpus import builtin_corpus, corpus_documents
from lockstep.data.dataset import IGNORE_INDEX
from lockstep.data.loader import DataLoader, build_token_windows, placement
from lockstep.data.order import SampleOrder
from lockstep.data.tokenizer import BytesTokenizer, build_tokenizer


def test_builtin_corpus_is_deterministic_and_split():
    corpus = builtin_corpus()
    assert len(corpus.sha256) == 64
    train = corpus.train_path.read_text().splitlines()
    validation = corpus.validation_path.read_text().splitlines()
    assert len(train) > 300 and 0 < len(validation) < len(train) / 10
    assert len(corpus_documents()) == len(train) + len(validation)
    assert "text" in json.loads(train[0])


def test_sample_order_is_a_permutation_per_epoch():
    order = SampleOrder(seed=5, num_windows=50)
    first_epoch = order.windows_of(range(50))
    assert sorted(first_epoch) == list(range(50))
    assert order.windows_of(range(50, 100)) != first_epoch
    assert SampleOrder(seed=5, num_windows=50).window_of(73) == order.window_of(73)
    assert SampleOrder(seed=6, num_windows=50).windows_of(range(50)) != first_epoch


def test_sample_order_is_a_true_permutation_at_every_small_size():
    """Exhaustive: every size up to 600 (odd bit widths and cycle walking included), two epochs each."""
    for num_windows in [*range(1, 601), 4097]:
        order = SampleOrder(seed=num_windows, num_windows=num_windows)
        for epoch in range(2):
            windows = order.windows_of(range(epoch * num_windows, (epoch + 1) * num_windows))
            assert sorted(windows) == list(range(num_windows)), num_windows


def test_sample_order_holds_no_state_that_grows_with_the_dataset():
    """10^10 windows: any sample is computed on demand; what the order keeps is one epoch's round keys."""
    order = SampleOrder(seed=1, num_windows=10**10)
    windows = order.windows_of(range(3 * 10**10 - 4, 3 * 10**10 + 4))  # across the epoch 2 -> 3 boundary
    assert all(0 <= w < 10**10 for w in windows) and len(set(windows)) == len(windows)
    state = [v for v in vars(order).values() if hasattr(v, "__len__")]
    assert sum(len(v) for v in state) <= 1 and all(k.nbytes <= 64 for k in order._keys.values())


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


def test_unshuffled_order_reads_windows_in_file_order_epoch_after_epoch():
    order = SampleOrder(seed=3, num_windows=5, shuffle=False)
    assert order.windows_of(range(12)) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert SampleOrder(seed=3, num_windows=5).windows_of(range(5)) != [0, 1, 2, 3, 4]  # shuffled by default


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
