"""The training data loader: global batches by step, split into microbatches, with a tiny state.

The state is {next_sample_index, dataset fingerprint}: global sample indices, never per-rank
offsets, so a checkpoint taken with one layout resumes with any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lockstep.config.sections import DataConfig, TrainingConfig
from lockstep.data.corpus import builtin_corpus
from lockstep.data.dataset import IGNORE_INDEX, TokenWindows, load_token_windows
from lockstep.data.order import SampleOrder
from lockstep.data.sources import DocumentSource, file_source
from lockstep.data.tokenizer import Tokenizer


@dataclass
class Microbatch:
    inputs: torch.Tensor
    """int64 [local_batch, seq_len]."""
    labels: torch.Tensor
    """int64 [local_batch, seq_len]; IGNORE_INDEX where no loss is taken."""

    @property
    def num_valid_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class DataLoader:
    """Serves the microbatches of each step. Global batch = consecutive global sample indices, cut
    into M = global_batch / local_batch microbatches (which samples form global microbatch j depends
    on nothing else). Which rank takes which microbatch is ``placement``: each rank's partial sums
    must be subtrees of the canonical summation tree over the global microbatch index
    (lockstep.parallel.canonical)."""

    def __init__(self, windows: TokenWindows, seed: int, global_batch: int, local_batch: int) -> None:
        self.windows = windows
        self.order = SampleOrder(seed, windows.num_windows)
        self.global_batch = global_batch
        self.local_batch = local_batch
        self.next_sample_index = 0

    def global_microbatch(self, step_start: int, microbatch_index: int) -> Microbatch:
        start = step_start + microbatch_index * self.local_batch
        inputs, labels = self.windows.batch(self.order.windows_of(range(start, start + self.local_batch)))
        return Microbatch(inputs, labels)

    def next_step(self, dp_rank: int = 0, dp_degree: int = 1, shard_degree: int = 1) -> tuple[list[Microbatch], int]:
        """This rank's microbatches of the next step in micro-step order (see ``placement``), and the
        valid-token count of the whole global batch (the loss denominator, identical on every rank)."""
        step_start = self.next_sample_index
        num_microbatches = self.global_batch // self.local_batch
        all_microbatches = [self.global_microbatch(step_start, k) for k in range(num_microbatches)]
        global_tokens = sum(m.num_valid_tokens for m in all_microbatches)
        self.next_sample_index += self.global_batch
        mine = placement(num_microbatches, dp_rank, dp_degree, shard_degree)
        return [all_microbatches[j] for j in mine], global_tokens

    def state_dict(self) -> dict:
        return {"next_sample_index": self.next_sample_index, "fingerprint": self.windows.fingerprint}

    def load_state_dict(self, state: dict, check: bool = True) -> None:
        if check and state["fingerprint"] != self.windows.fingerprint:
            raise ValueError(
                "the checkpoint's dataset/tokenizer fingerprint differs from this run's; "
                "the data or tokenizer changed since it was saved"
            )
        self.next_sample_index = int(state["next_sample_index"])


def placement(num_microbatches: int, dp_rank: int, dp_degree: int, shard_degree: int = 1) -> list[int]:
    """The global microbatch index that data-parallel rank `dp_rank` (= replica x shard_degree +
    shard) handles at each of its micro-steps.

    Each replica takes a contiguous block of M/replicas microbatches, and within it the
    `shard_degree` ranks that reduce-scatter together take them strided: shard s handles block
    microbatch k * shard_degree + s at micro-step k. So every micro-step's reduce-scatter sums an
    aligned run of `shard_degree` microbatches (a complete subtree of the canonical tree, all
    degrees being powers of two) and the sum over micro-steps can be kept on the shards. With
    shard_degree 1 (the tree summed before any reduce-scatter) rank r takes the contiguous block
    [r * M/D, (r+1) * M/D)."""
    replica, shard = divmod(dp_rank, shard_degree)
    block = num_microbatches // (dp_degree // shard_degree)
    return [replica * block + k * shard_degree + shard for k in range(num_microbatches // dp_degree)]


def document_source(training: TrainingConfig, data: DataConfig) -> tuple[DocumentSource, str]:
    """The configured documents and their fingerprint (the built-in corpus uses its sha256)."""
    if training.dataset == "builtin":
        corpus = builtin_corpus(data.cache_folder)
        return DocumentSource("builtin", (corpus.train_path,), "text"), corpus.sha256
    source = file_source(training.dataset, training.dataset_path, data.text_field)
    return source, source.fingerprint()


def build_token_windows(training: TrainingConfig, data: DataConfig, tokenizer: Tokenizer) -> TokenWindows:
    source, fingerprint = document_source(training, data)
    return load_token_windows(source, tokenizer, training.seq_len, data.cache_folder, fingerprint)
