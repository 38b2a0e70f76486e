"""The training loop and the one place that holds the whole job config.

The trainer resolves cross-section values once (device, seed, batch sizes), hands each component
its own section, and runs a loop short enough to read in one sitting: fetch the step's microbatches,
forward/backward each with the loss normalised by the global valid-token count, clip, step, log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lockstep.config import JobConfig, dump_toml, validate_job_config
from lockstep.config.errors import ConfigError
from lockstep.config.job import data_parallel_degree, resolve_global_batch_size
from lockstep.config.sections import TrainingConfig
from lockstep.data.cache import cache_root
from lockstep.data.loader import DataLoader, build_token_windows
from lockstep.data.tokenizer import build_tokenizer
from lockstep.models.registry import check_model_name
from lockstep.parallel.canonical import TreeSum, clip_, grad_norm_fp64, tree_all_reduce
from lockstep.parallel.process_group import destroy_process_group, init_process_group, world_from_env
from lockstep.train.determinism import (
    agree_on_seed,
    configure_determinism,
    derived_seed,
    resolve_root_seed,
    seed_everything,
)
from lockstep.train.loss import global_batch_loss
from lockstep.train.metrics import ConsoleDisplay, MetricsLogger, format_record
from lockstep.train.model_factory import build_model
from lockstep.train.optimizer import build_lr_scheduler, build_optimizer
from lockstep.train.run_folder import environment, prepare_run_folder
from lockstep.train.throughput import peak_flops, peak_memory_gib


def resolve_device(training: TrainingConfig) -> torch.device:
    if training.device == "cuda" or (training.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device", "cuda was asked for but torch sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0


class GracefulStop:
    """SIGTERM or a first Ctrl-C asks the loop to stop after the current step (metrics flushed);
    a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class Trainer:
    def __init__(self, config: JobConfig, show_progress: bool = True) -> None:
        self.world = world_from_env()
        validate_job_config(config, self.world.world_size)
        check_model_name(config.model)
        self.config = config
        self.device = resolve_device(config.training)
        self.dp_degree = data_parallel_degree(config.parallelism, self.world.world_size)
        if config.model.attention == "flex" and self.device.type != "cuda":
            raise ConfigError("model.attention", "FlexAttention has no CPU backward in torch 2.13; use sdpa on CPU")
        configure_determinism(config.debug)
        init_process_group(self.world, self.device)
        config.debug.seed = agree_on_seed(resolve_root_seed(config.debug))  # written to config.toml: the run repeats
        self.seeds = seed_everything(config.debug.seed) | {"data": derived_seed(config.debug.seed, "data")}

        training = config.training
        self.tokenizer = build_tokenizer(config.model, config.data)
        windows = build_token_windows(training, config.data, self.tokenizer)
        self.global_batch = resolve_global_batch_size(training, self.dp_degree)
        self.loader = DataLoader(windows, self.seeds["data"], self.global_batch, training.local_batch_size)

        self.model = build_model(
            config.model, config.activation_checkpoint, config.compile,
            self.tokenizer.vocab_size, training.seq_len, config.debug.seed, self.device,
        )  # fmt: skip
        self.optimizer = build_optimizer(self.model.parameters(), config.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, config.lr_scheduler, training.steps)
        self.loss_fn = global_batch_loss
        if config.compile.enable and "loss" in config.compile.components:
            self.loss_fn = torch.compile(global_batch_loss)
        self.state = TrainState()

        self.run_folder = Path(config.job.dump_folder)
        fingerprints = {"dataset": windows.fingerprint, "tokenizer": self.tokenizer.fingerprint}
        env = environment(self.device, self.world.world_size, self.seeds, fingerprints)
        self.metrics = None
        if self.world.is_main:  # rank 0 writes the run folder and prints
            metrics_file = prepare_run_folder(self.run_folder, dump_toml(config), env)
            self.metrics = MetricsLogger(config.metrics, self.run_folder, metrics_file, self.run_folder.name)
        self.display = ConsoleDisplay(training.steps, self.state.step, enabled=show_progress and self.world.is_main)
        self.flops_per_token = self.model.num_flops_per_token(training.seq_len)
        self.peak_flops = peak_flops(
            self.device, training.mixed_precision, cache_root(config.data.cache_folder) / "peak_flops.json"
        )

    def _autocast(self):
        if self.config.training.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the global batch; returns (loss, grad norm) as fp32 tensors."""
        microbatches, global_tokens = self.loader.next_step(self.world.rank, self.dp_degree)
        params = [p for p in self.model.parameters() if p.requires_grad]
        invariant = self.config.debug.layout_invariant_reductions
        grad_sum, loss_sum = TreeSum(), TreeSum()
        for mb in microbatches:
            inputs, labels = mb.inputs.to(self.device), mb.labels.to(self.device)
            masks = (
                self.model.get_attention_masks(inputs, self.tokenizer.eos_id)
                if self.config.data.document_masking
                else None
            )
            with self._autocast():
                microbatch_loss = self.loss_fn(self.model(inputs, masks), labels, global_tokens)
            microbatch_loss.backward()
            loss_sum.add([microbatch_loss.detach().reshape(1)])
            if invariant:  # take the grads out of .grad so the tree, not autograd, sums them
                grad_sum.add([p.grad for p in params])
                for p in params:
                    p.grad = None
        grads = grad_sum.result() if invariant else [p.grad for p in params]
        grads, loss = self._reduce_across_ranks(grads, loss_sum.result()[0], invariant)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        max_norm = self.config.training.max_norm
        if invariant:
            grad_norm = grad_norm_fp64(grads)
            if max_norm > 0:
                clip_(grads, grad_norm, max_norm)
        elif max_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss[0], grad_norm

    def _reduce_across_ranks(
        self, grads: list[torch.Tensor], loss: torch.Tensor, invariant: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sum the per-rank partial gradients and loss over data-parallel ranks, in one buffer."""
        if self.dp_degree == 1:
            return grads, loss
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss])
        if invariant:
            flat = tree_all_reduce(flat)
        else:
            torch.distributed.all_reduce(flat)
        pieces = flat.split([g.numel() for g in grads] + [1])
        return [p.view_as(g) for p, g in zip(pieces, grads, strict=False)], pieces[-1]

    def train(self) -> Path:
        """Train to training.steps (or until SIGTERM/Ctrl-C); returns the run folder."""
        training, steps = self.config.training, self.config.training.steps
        tokens_per_step = self.global_batch * training.seq_len
        self.display.print(f"run folder {self.run_folder}  seed {self.config.debug.seed}  device {self.device}")
        interval_start, interval_steps = time.perf_counter(), 0
        with GracefulStop().installed() as stop:
            try:
                stopping = False
                while self.state.step < steps and not stopping:
                    lr = self.lr_scheduler.get_last_lr()[0]
                    loss, grad_norm = self.train_step()
                    self.state.step += 1
                    self.state.tokens_seen += tokens_per_step
                    interval_steps += 1
                    stopping = stop.requested  # read once: the step we stop after is always logged
                    if self._should_log(self.state.step, steps, stopping):
                        elapsed = time.perf_counter() - interval_start
                        record = self._record(loss, grad_norm, lr, interval_steps * tokens_per_step / elapsed)
                        if self.metrics is not None:
                            self.metrics.log(record)
                        self.display.print(format_record(record))
                        interval_start, interval_steps = time.perf_counter(), 0
                    self.display.step(self.state.step, None)
                if stopping:
                    self.display.print(f"stopped by signal after step {self.state.step}")
            finally:
                if self.metrics is not None:
                    self.metrics.close()
                self.display.close()
                destroy_process_group()
        return self.run_folder

    def _should_log(self, step: int, last_step: int, stopping: bool) -> bool:
        return stopping or step == 1 or step == last_step or step % self.config.metrics.log_freq == 0

    def _record(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, tokens_per_sec: float) -> dict:
        tflops = tokens_per_sec * self.flops_per_token / 1e12
        return {
            "step": self.state.step,
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "tokens_per_sec": tokens_per_sec,
            "tflops": tflops,
            "mfu": 100 * tflops * 1e12 / self.peak_flops,
            "memory_gib": peak_memory_gib(self.device),
            "tokens_seen": self.state.tokens_seen,
        }
