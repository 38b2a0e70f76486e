"""The held-out loss, with the promises of the training loss: exact, layout-invariant, and unable to
disturb the run it measures.

An evaluation reads the first windows of the validation split in order (never shuffled, so every
evaluation sees the same tokens), ``steps`` global batches of them, or all of them. Global
microbatch g holds windows [g*b, (g+1)*b); the last one is padded with windows whose labels are all
ignored, which add an exact 0.

The loss is the summed token cross-entropy of the whole evaluation divided by its valid-token count,
not a mean of per-batch or per-rank means. Each microbatch's fp32 sum goes into its global slot of a
vector; the vector is summed over the data-parallel (and pipeline) ranks, where every slot has one
non-zero term, so that sum is exact; the slots are then added as a pairwise tree in global order
(``tree_reduce_rows``, zero-padded to a power of two, and x + 0 = x). So ``val_loss`` has the same
bits in one process, DDP, FSDP, HSDP and PP for the same microbatch size.

Nothing of training moves: no gradients, the RNG states are restored, MoE routed-token counts
(which move the router bias) are paused, and the loader is the validator's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lockstep.config.errors import ConfigError
from lockstep.config.job import ValidationBatches
from lockstep.config.sections import DataConfig, TrainingConfig, ValidationConfig
from lockstep.data.corpus import builtin_corpus
from lockstep.data.dataset import IGNORE_INDEX, TokenWindows, load_prepared_windows, load_token_windows
from lockstep.data.loader import Microbatch, held_out_windows
from lockstep.data.sources import DocumentSource, file_source
from lockstep.data.tokenizer import Tokenizer
from lockstep.models.common.moe import token_counting_paused
from lockstep.parallel.canonical import tree_reduce_rows

SummedLosses = Callable[[list[Microbatch]], list[torch.Tensor] | None]
"""Runs this rank's microbatches of one evaluation step forward and returns each one's summed
cross-entropy (fp32, one element), or None on a rank that holds no loss (a pipeline's earlier stages)."""


def validation_windows(
    validation: ValidationConfig,
    data: DataConfig,
    tokenizer: Tokenizer,
    seq_len: int,
    nodes: int = 1,
    *,
    training: TrainingConfig,
) -> TokenWindows:
    """The validation split, tokenized once (cached) like training data (a job of several `nodes` only
    uses a cache entry that exists: lockstep.data.auto_prepare); with data.validation_fraction, the
    training source's held-out documents."""
    if data.validation_fraction:
        return held_out_windows(training, data, tokenizer, seq_len, nodes)
    kind = validation.dataset or "builtin"
    if kind == "prepared":
        return load_prepared_windows(Path(validation.dataset_path), tokenizer, seq_len)
    if kind == "builtin":
        corpus = builtin_corpus(data.cache_folder)
        source = DocumentSource("builtin-validation", (corpus.validation_path,), "text")
        fingerprint = f"{corpus.sha256}/validation"
    else:  # prepared into the cache once, found again by the files' paths, sizes and times
        source = file_source(kind, validation.dataset_path, data.text_field, key="validation.dataset_path")
        fingerprint = None
    return load_token_windows(source, tokenizer, seq_len, data.cache_folder, fingerprint, nodes=nodes)


@dataclass
class Evaluation:
    loss: float
    tokens: int

    def as_record(self) -> dict[str, float | int]:
        ppl = math.exp(self.loss) if self.loss < 700 else math.inf
        return {"val_loss": self.loss, "val_ppl": ppl, "val_tokens": self.tokens}


class Validator:
    """Evaluates every ``validation.freq`` steps and after the last one; built from its section and
    the runtime pieces it needs (the split, the batch shape, this rank's place, a forward)."""

    def __init__(
        self,
        validation: ValidationConfig,
        *,
        windows: TokenWindows,
        batches: ValidationBatches,
        dp_rank: int,
        dp_degree: int,
        summed_losses: SummedLosses,
        groups: list[dist.ProcessGroup | None],
        device: torch.device,
    ) -> None:
        self.validation = validation
        self.windows = windows
        self.batches = batches
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.summed_losses = summed_losses
        self.groups = [g for g in groups if g is not None]
        """Summed over in order: data-parallel ranks, then pipeline stages."""
        self.device = device
        if batches.local_batch > windows.num_windows:  # each microbatch is padded to the full batch
            raise ConfigError(
                "validation.local_batch_size",
                f"{batches.local_batch} is more than the validation split's {windows.num_windows} windows of "
                f"seq_len + 1 tokens; use at most {windows.num_windows}",
            )
        self.microbatches_per_step = batches.global_batch // batches.local_batch
        whole_split = -(-windows.num_windows // batches.global_batch)
        self.num_steps = whole_split if validation.steps == -1 else min(validation.steps, whole_split)

    def due(self, step: int, last_step: int) -> bool:
        return step % self.validation.freq == 0 or step == last_step

    def _microbatch(self, index: int) -> Microbatch:
        """Global microbatch `index`: windows in order, past the end padded with ignored labels."""
        b = self.batches.local_batch
        first = index * b
        real = [w for w in range(first, first + b) if w < self.windows.num_windows]
        inputs, labels = self.windows.batch(real + [0] * (b - len(real)))
        labels[len(real) :] = IGNORE_INDEX
        return Microbatch(inputs, labels)

    def _mine(self, step: int) -> list[int]:
        """This rank's global microbatch indices in one evaluation step (a contiguous block)."""
        per_rank = self.microbatches_per_step // self.dp_degree
        first = step * self.microbatches_per_step + self.dp_rank * per_rank
        return list(range(first, first + per_rank))

    def evaluate(self) -> Evaluation:
        slots = self.num_steps * self.microbatches_per_step
        sums = torch.zeros(slots + 1, dtype=torch.float64, device=self.device)  # last: the valid-token count
        with torch.no_grad(), token_counting_paused(), rng_restored(self.device):
            for step in range(self.num_steps):
                indices = self._mine(step)
                microbatches = [self._microbatch(g) for g in indices]
                losses = self.summed_losses(microbatches)
                if losses is None:  # no loss here: this rank adds exact zeros
                    continue
                sums[indices] = torch.cat([loss.reshape(1) for loss in losses]).double()
                sums[-1] += sum(mb.num_valid_tokens for mb in microbatches)
        for group in self.groups:
            dist.all_reduce(sums, group=group)  # one non-zero term per slot: exact in any order
        padded = torch.zeros(1 << max(slots - 1, 0).bit_length(), dtype=torch.float32, device=self.device)
        padded[:slots] = sums[:slots].float()
        total, tokens = torch.stack([tree_reduce_rows(padded).double(), sums[-1]]).tolist()
        return Evaluation(total / tokens if tokens else math.nan, int(tokens))


def rng_restored(device: torch.device):
    """Leaves every torch RNG stream of this process where it was (a forward that draws nothing changes
    nothing; one that does cannot shift training's streams)."""
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device], device_type="cuda")
    return torch.random.fork_rng(devices=[])
