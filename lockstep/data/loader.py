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
    into M = global_batch / local_batch microbatches; data-parallel rank r of D takes the contiguous
    block of microbatches [r * M/D, (r+1) * M/D), so each rank's partial sums are subtrees of the
    canonical summation tree over the global microbatch index (lockstep.parallel.canonical)."""

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

    def next_step(self, dp_rank: int = 0, dp_degree: int = 1) -> tuple[list[Microbatch], int]:
        """This rank's microbatches of the next step, and the valid-token count of the whole global
        batch (the loss denominator, identical on every rank)."""
        step_start = self.next_sample_index
        num_microbatches = self.global_batch // self.local_batch
        all_microbatches = [self.global_microbatch(step_start, k) for k in range(num_microbatches)]
        global_tokens = sum(m.num_valid_tokens for m in all_microbatches)
        self.next_sample_index += self.global_batch
        per_rank = num_microbatches // dp_degree
        return all_microbatches[dp_rank * per_rank : (dp_rank + 1) * per_rank], global_tokens

    def state_dict(self) -> dict:
        return {"next_sample_index": self.next_sample_index, "fingerprint": self.windows.fingerprint}

    def load_state_dict(self, state: dict, check: bool = True) -> None:
        if check and state["fingerprint"] != self.windows.fingerprint:
            raise ValueError(
                "the checkpoint's dataset/tokenizer fingerprint differs from this run's; "
                "the data or tokenizer changed since it was saved"
            )
        self.next_sample_index = int(state["next_sample_index"])


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
