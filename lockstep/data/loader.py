"""The training data loader: global batches by step, split into microbatches, with a tiny state.

The state is {next_sample_index, dataset fingerprint}: global sample indices, never per-rank
offsets, so a checkpoint taken with one layout resumes with any other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lockstep.config.sections import DataConfig, TrainingConfig
from lockstep.data.corpus import builtin_corpus
from lockstep.data.dataset import IGNORE_INDEX, TokenWindows, load_prepared_windows, load_token_windows
from lockstep.data.mixture import MixtureWindows, load_mixture
from lockstep.data.order import ORDER_VERSION, SampleOrder
from lockstep.data.sources import DocumentSource, file_source
from lockstep.data.split import split_windows
from lockstep.data.tokenizer import Tokenizer
from lockstep.errors import LockstepError


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
    (lockstep.parallel.canonical).

    A rank reads only its own microbatches. The step's valid-token count (the loss denominator) comes
    from the windows' counts (``TokenWindows.valid_tokens``, the document index alone): with
    ``sum_over_ranks`` set (the trainer's data-parallel sum) each rank counts its own samples and one
    integer all-reduce gives the step's count, so a rank of a 512-rank job touches no shard it does not
    read; without it (fault tolerance's blocks, tools) the count covers the whole step. The
    next step's batches are read by a background thread while this one trains (the order is a pure
    function of the sample index, so reading ahead cannot change it); ``take_wait_s`` says how long
    the trainer waited for data since it last asked.

    With a mixture (lockstep.data.mixture) the windows are its sources' and the order its interleaving;
    ``take_source_tokens`` gives the valid tokens per source of the steps consumed since it last asked."""

    def __init__(
        self,
        windows: TokenWindows | MixtureWindows,
        *,
        seed: int,
        global_batch: int,
        local_batch: int,
        shuffle: bool = True,
    ) -> None:
        self.windows = windows
        self.shuffle = shuffle
        self.order = (
            windows.sample_order(seed, shuffle)
            if isinstance(windows, MixtureWindows)
            else SampleOrder(seed, windows.num_windows, shuffle)
        )
        self.global_batch = global_batch
        self.local_batch = local_batch
        self.next_sample_index = 0
        self.step_start = 0
        """The first global sample index of the step next_step (or next_blocks) last returned."""
        self.pin_memory = False
        """Pin the read-ahead batches (CUDA: the copies to the device can then be asynchronous)."""
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lockstep-data")
        self._ahead: tuple[tuple, Future] | None = None
        self._wait_s = 0.0
        self._source_tokens: dict[str, int] = {}
        self.sum_over_ranks: Callable[[list[int]], list[int]] | None = None
        """Sums a list of integer counts over the data-parallel ranks (each rank passing its own), or
        None: every rank then counts the whole step itself. Called on the caller's thread."""

    def global_microbatch(
        self, step_start: int, microbatch_index: int, windows: dict[int, int] | None = None
    ) -> Microbatch:
        """Global microbatch `microbatch_index` of the step starting at `step_start`; `windows` maps global
        samples to their windows where the caller computed them already."""
        samples = range(
            step_start + microbatch_index * self.local_batch, step_start + (microbatch_index + 1) * self.local_batch
        )
        window_ids = self.order.windows_of(samples) if windows is None else [windows[g] for g in samples]
        inputs, labels = self.windows.batch(window_ids)
        return Microbatch(inputs, labels)

    def _read_step(
        self, step_start: int, mine: tuple[int, ...], step_samples: int
    ) -> tuple[list[Microbatch], int, dict[str, int]]:
        samples = range(step_start, step_start + step_samples)
        if self.sum_over_ranks is not None:  # this rank's samples only; next_blocks sums over the ranks
            own = (step_start + j * self.local_batch + i for j in mine for i in range(self.local_batch))
            samples = sorted(own)
        step_windows = self.order.windows_of(samples)  # once: the microbatches' windows are among them
        window_of = dict(zip(samples, step_windows, strict=True))
        microbatches = [self.global_microbatch(step_start, j, window_of) for j in mine]
        if self.pin_memory:
            microbatches = [Microbatch(mb.inputs.pin_memory(), mb.labels.pin_memory()) for mb in microbatches]
        if isinstance(self.windows, MixtureWindows):
            by_source = self.windows.valid_tokens_by_source(step_windows)
            return microbatches, sum(by_source.values()), by_source
        return microbatches, self.windows.valid_tokens(step_windows), {}

    def next_step(self, dp_rank: int = 0, dp_degree: int = 1, shard_degree: int = 1) -> tuple[list[Microbatch], int]:
        """This rank's microbatches of the next step in micro-step order (see ``placement``), and the
        valid-token count of the whole global batch (the loss denominator, identical on every rank)."""
        (microbatches,), global_tokens = self.next_blocks((0,), 1, dp_rank, dp_degree, shard_degree)
        return microbatches, global_tokens

    def next_blocks(
        self,
        blocks: tuple[int, ...],
        num_blocks: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
        shard_degree: int = 1,
        step_samples: int | None = None,
    ) -> tuple[list[list[Microbatch]], int]:
        """This rank's microbatches of some blocks of the next step: the step's `step_samples` samples
        (the global batch by default) cut into `num_blocks` equal blocks of consecutive microbatches,
        each placed over the ranks as a step of its own (fault tolerance: replica groups compute
        blocks). Returns them per block, and the valid-token count of the whole step."""
        step_samples = self.global_batch if step_samples is None else step_samples
        per_block = step_samples // self.local_batch // num_blocks
        inside = placement(per_block, dp_rank, dp_degree, shard_degree)
        mine = tuple(b * per_block + j for b in blocks for j in inside)
        key = (self.next_sample_index, mine, step_samples)
        started = time.perf_counter()
        if self._ahead is not None and self._ahead[0] == key:
            result = self._ahead[1].result()
        else:
            result = self._read_step(*key)
        self._wait_s += time.perf_counter() - started
        microbatches, global_tokens, by_source = result
        if self.sum_over_ranks is not None:
            names = sorted(by_source)
            summed = self.sum_over_ranks([global_tokens, *(by_source[name] for name in names)])
            global_tokens, by_source = summed[0], dict(zip(names, summed[1:], strict=True))
        for name, tokens in by_source.items():  # counted here, when the step is consumed, not when read ahead
            self._source_tokens[name] = self._source_tokens.get(name, 0) + tokens
        self.step_start = self.next_sample_index
        self.next_sample_index += step_samples
        following = (self.next_sample_index, mine, step_samples)
        self._ahead = (following, self._reader.submit(self._read_step, *following))
        return [microbatches[i : i + len(inside)] for i in range(0, len(microbatches), len(inside))], global_tokens

    def start_at_step(self, step: int) -> None:
        """Serve step `step` + 1 next, as a run that took `step` full global batches would: for a run that goes
        on from another framework's checkpoint, whose own data position means nothing in this order."""
        self.next_sample_index = step * self.global_batch
        self._ahead = None

    def position(self) -> tuple[int, dict[str, int]]:
        """Where the next step starts, with the source-token counts not yet taken (see ``rewind``)."""
        return self.next_sample_index, dict(self._source_tokens)

    def rewind(self, position: tuple[int, dict[str, int]]) -> None:
        """Go back to a ``position``: a step that was not committed (fault tolerance) is read again."""
        self.next_sample_index, self._source_tokens = position[0], dict(position[1])

    def take_wait_s(self) -> float:
        """Seconds spent waiting for data in next_step since the last call."""
        waited, self._wait_s = self._wait_s, 0.0
        return waited

    def take_source_tokens(self) -> dict[str, int]:
        """Valid (loss-taking) tokens per mixture source in the steps next_step returned since the last
        call, for metrics as data/tokens/NAME; empty without a mixture."""
        taken, self._source_tokens = self._source_tokens, {}
        return taken

    def state_dict(self) -> dict:
        return {
            "next_sample_index": self.next_sample_index,
            "fingerprint": self.windows.fingerprint,
            "order_version": ORDER_VERSION,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict, check: bool = True) -> None:
        if check and state["fingerprint"] != self.windows.fingerprint:
            raise LockstepError(
                "the checkpoint's dataset/tokenizer fingerprint differs from this run's; "
                "the data or tokenizer changed since it was saved"
            )
        saved_order = int(state.get("order_version", 1))  # checkpoints before the version was recorded: 1
        if check and saved_order != ORDER_VERSION:
            raise LockstepError(
                f"the checkpoint was written with sample order {saved_order}, this lockstep reads order "
                f"{ORDER_VERSION} (lockstep.data.order): resumed steps would read other windows than the run "
                "would have; --checkpoint.ignore_mismatch resumes with the new order anyway"
            )
        if check and bool(state.get("shuffle", True)) != self.shuffle:  # absent: saved before it was an option
            raise LockstepError(
                f"the checkpoint was written with data.shuffle = {not self.shuffle}, this run has {self.shuffle}: "
                "resumed steps would read other windows; keep the setting, or pass --checkpoint.ignore_mismatch"
            )
        self.next_sample_index = int(state["next_sample_index"])
        self._ahead = None  # read for another position


def placement(num_microbatches: int, dp_rank: int, dp_degree: int, shard_degree: int = 1) -> list[int]:
    """The global microbatch index that data-parallel rank `dp_rank` (= replica x shard_degree +
    shard) handles at each of its micro-steps.

    Each replica takes a contiguous block of M/replicas microbatches, and within it the
    `shard_degree` ranks that reduce-scatter together take them strided: shard s handles block
    microbatch k * shard_degree + s at micro-step k. So every micro-step's reduce-scatter sums an
    aligned run of `shard_degree` microbatches (a complete subtree of the canonical tree: a power-of-two
    shard degree, or one micro-step) and the sum over micro-steps can be kept on the shards. With
    shard_degree 1 (the tree summed before any reduce-scatter) rank r takes the contiguous block
    [r * M/D, (r+1) * M/D)."""
    replica, shard = divmod(dp_rank, shard_degree)
    block = num_microbatches // (dp_degree // shard_degree)
    return [replica * block + k * shard_degree + shard for k in range(num_microbatches // dp_degree)]


def document_source(training: TrainingConfig, data: DataConfig) -> tuple[DocumentSource, str | None]:
    """The configured documents and their fingerprint: the built-in corpus's sha256, or None for files
    (then the digests taken while preparing them give it, so a start does not re-read the data)."""
    if training.dataset == "builtin":
        corpus = builtin_corpus(data.cache_folder)
        return DocumentSource("builtin", (corpus.train_path,), "text"), corpus.sha256
    return file_source(training.dataset, training.dataset_path, data.text_field), None


def build_token_windows(
    training: TrainingConfig, data: DataConfig, tokenizer: Tokenizer, nodes: int = 1
) -> TokenWindows | MixtureWindows:
    """The training windows: a mixture of prepared folders (data.mixture), a prepared folder as it is
    (lockstep data prepare), anything else prepared into the cache first (once per machine; a job of
    several `nodes` only uses an entry that exists); less the held-out documents with
    data.validation_fraction (lockstep.data.split)."""
    if data.mixture:
        return load_mixture(data.mixture, tokenizer, training.seq_len)
    windows = source_windows(training, data, tokenizer, nodes)
    if data.validation_fraction:
        return split_windows(windows, data.validation_fraction, validation=False)
    return windows


def held_out_windows(
    training: TrainingConfig, data: DataConfig, tokenizer: Tokenizer, seq_len: int, nodes: int = 1
) -> TokenWindows:
    """The validation side of data.validation_fraction: the training source's held-out documents, as
    windows of `seq_len`."""
    return split_windows(source_windows(training, data, tokenizer, nodes), data.validation_fraction,
                         validation=True, seq_len=seq_len)  # fmt: skip


def source_windows(training: TrainingConfig, data: DataConfig, tokenizer: Tokenizer, nodes: int = 1) -> TokenWindows:
    """Every document of the one training source (a prepared folder, or files prepared into the cache)."""
    if training.dataset == "prepared":
        return load_prepared_windows(Path(training.dataset_path), tokenizer, training.seq_len)
    source, fingerprint = document_source(training, data)
    return load_token_windows(source, tokenizer, training.seq_len, data.cache_folder, fingerprint, nodes=nodes)
