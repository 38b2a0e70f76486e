"""The record of a logged step: the one dictionary that goes to metrics.jsonl, TensorBoard, wandb and
the console.

A step hook beside the loop, built from the metrics section. Its contract, as every observer's:

- collectives only on agreed steps: ``due`` is a pure function of the step, the last step and the
  agreed stop flag, so every rank records on the same steps, and ``record`` (which all-gathers the
  step metrics and pools the MoE statistics over the pipeline stages) is called on those steps only;
- it holds no reference to the trainer: only the components whose figures it reads (the loader's
  wait and token counts, the step metrics, this rank's fingerprint file, the torchft manager's
  counters) and plain numbers.
"""

from __future__ import annotations

import time
from typing import Any

import torch.distributed as dist

from lockstep.config.sections import MetricsConfig
from lockstep.data.loader import DataLoader
from lockstep.train.observe.fingerprint import RankFingerprints
from lockstep.train.observe.moe_balance import MoEStats, pool_over_stages
from lockstep.train.observe.step_metrics import StepMetrics
from lockstep.train.observe.throughput import mfu_percent
from lockstep.train.resilience.fault_tolerance import FaultTolerance
from lockstep.train.state import StepResult, TrainState
from lockstep.wall_clock import wall_s


class StepRecorder:
    """Builds the record of each logged step and times the tokens trained since the last one."""

    def __init__(
        self,
        metrics: MetricsConfig,
        *,
        loader: DataLoader,
        step_metrics: StepMetrics,
        rank_fingerprints: RankFingerprints,
        flops_per_token: float,
        peak_flops: float,
        world_size: int,
        moe_group: dist.ProcessGroup | None = None,
        replica_groups: FaultTolerance | None = None,
    ) -> None:
        self.log_freq = metrics.log_freq
        self.loader = loader
        """Read for its wait and its tokens per source since the last record (take_wait_s, take_source_tokens)."""
        self.step_metrics = step_metrics
        self.rank_fingerprints = rank_fingerprints
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.moe_group = moe_group
        """The pipeline stages' group over which MoE statistics are pooled (None: nothing to pool)."""
        self.replica_groups = replica_groups
        """The torchft manager (FaultTolerance) or None: its participants scale the MFU, its record is added."""
        self.interval_start = time.perf_counter()
        self.interval_tokens = 0

    def due(self, step: int, last_step: int, stopping: bool) -> bool:
        """Whether `step` is logged: step 1, the last step, every metrics.log_freq-th, and the step a
        run stops after (`stopping` is agreed by all ranks)."""
        return stopping or step == 1 or step == last_step or step % self.log_freq == 0

    def count(self, tokens: int) -> None:
        """A committed step trained on `tokens` tokens."""
        self.interval_tokens += tokens

    def restart_interval(self) -> None:
        """Start timing the next interval (after a record is logged, so logging and evaluation time
        count in neither)."""
        self.interval_start, self.interval_tokens = time.perf_counter(), 0

    def record(self, result: StepResult, *, state: TrainState, lr: float) -> dict[str, Any]:
        """The record of the step `state` has just reached; collectives on every rank (call on due
        steps only). Writes this rank's fingerprints when the step computed them."""
        tokens_per_sec = self.interval_tokens / (time.perf_counter() - self.interval_start)
        if result.local_digests:  # every rank its own part, for lockstep replay
            self.rank_fingerprints.write(state.step, result.local_digests)
        tflops = tokens_per_sec * self.flops_per_token / 1e12
        groups = self.replica_groups.participants if self.replica_groups is not None else 1
        return (
            {
                "step": state.step,
                "loss": result.loss_value,
                "grad_norm": result.grad_norm_value,
                "lr": lr,
                "tokens_per_sec": tokens_per_sec,
                "tflops": tflops,
                "mfu": mfu_percent(tflops, self.peak_flops, self.world_size * groups),
                "tokens_seen": state.tokens_seen,
                "elapsed_s": state.elapsed_s,
                "wall_s": wall_s(),
                "data_wait_s": self.loader.take_wait_s(),  # since the last record: the loader's share of it
            }
            | {f"data/tokens/{name}": tokens for name, tokens in self.loader.take_source_tokens().items()}
            | self.step_metrics.record()  # a collective: every rank logs the same steps
            | result.fingerprints
            | self.moe_record(result.moe)
            | (self.replica_groups.record() if self.replica_groups is not None else {})
        )

    def moe_record(self, stats: MoEStats | None) -> dict[str, float]:
        """The MoE statistics of every stage (one read; with a group, a collective)."""
        if stats is None:
            return {}
        return pool_over_stages(stats.as_floats(), self.moe_group)
