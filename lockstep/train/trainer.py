"""The training loop and the one place that holds the whole job config.

The trainer starts the process through ``runtime.start_runtime`` (lock, environment, flags, process
group, mesh and seeds, in the order that one function owns), resolves the batch sizes once, hands each
component its own section, and runs a loop short enough to read in one sitting: fetch the step's microbatches,
forward/backward each with the loss normalised by the global valid-token count, clip, step, log.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from lockstep.checkpoint.states import ModelState, ObjectState, OptimizerState, RNGState, SchedulerState
from lockstep.config import JobConfig, dump_toml
from lockstep.config.job import (
    ValidationBatches,
    deterministic_chunks,
    microbatch_size,
    resolve_group_batch_size,
    resolve_validation,
)
from lockstep.data.cache import cache_root
from lockstep.data.dataset import TokenWindows
from lockstep.data.loader import DataLoader, build_token_windows
from lockstep.data.tokenizer import Tokenizer, build_tokenizer
from lockstep.models.registry import model_args, model_spec
from lockstep.models.size import describe_parameters, parameter_counts
from lockstep.parallel.canonical import canonical_nodes, full_value
from lockstep.parallel.mesh import AXES, axis_rank
from lockstep.parallel.node_levels import data_parallel_levels
from lockstep.parallel.parallelize import BuildSettings, build_model
from lockstep.parallel.process_group import destroy_process_group
from lockstep.parallel.reducer import CrossRankReducer
from lockstep.run.lock import RunLock
from lockstep.run.resume import config_record, shared_settings
from lockstep.run.start import record_launch
from lockstep.train.checkpointing import RunCheckpoints
from lockstep.train.forward_backward import ForwardBackward, LossSettings, canonical_gradient_tree
from lockstep.train.guards.step_guards import StepGuards
from lockstep.train.loss import PipelineLoss, global_batch_loss
from lockstep.train.observe.display import ConsoleDisplay, format_record
from lockstep.train.observe.fingerprint import RankFingerprints
from lockstep.train.observe.moe_balance import moe_blocks
from lockstep.train.observe.profiling import Profiler
from lockstep.train.observe.sample_losses import SampleLosses, StepPlace
from lockstep.train.observe.step_metrics import StepMetrics, memory_timeline
from lockstep.train.observe.step_record import StepRecorder
from lockstep.train.observe.throughput import peak_flops
from lockstep.train.optimizer import build_lr_scheduler, build_optimizer
from lockstep.train.resilience.fault_tolerance import FaultTolerance, LighthouseLost
from lockstep.train.resilience.stop import LaunchEvents
from lockstep.train.runtime import Runtime, start_runtime
from lockstep.train.state import GracefulStop, StepResult, TrainState
from lockstep.train.step import GradientSource, GroupPasses, LocalGradients, ReplicaGroupGradients, TrainStep
from lockstep.train.validation import Validator, validation_windows


def _trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _undoes_its_start_on_error(init: Callable) -> Callable:
    """Decorate Trainer.__init__: if any stage raises, what the earlier stages started is ended (the
    metrics file closed, the torchft manager shut down, the run lock released, the process group this
    trainer started destroyed), so a failed start leaves no heartbeat, lock or group behind."""

    @functools.wraps(init)
    def wrapper(self: Trainer, *args, **kwargs) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            self.abandon_start()
            raise

    return wrapper


class Trainer:
    stopped_by_signal: bool = False
    """Set by train() when it stopped before training.steps (SIGTERM/SIGINT/SIGHUP, or a lost lighthouse):
    the CLI exits 75 or 76, so that a scheduler or script can tell a stop to resume from a finished run."""
    stop_saved: bool = False
    """Stopped early with the last step saved (exit 75); stopped without a save exits 76."""

    runtime: Runtime | None = None
    run_lock: RunLock | None = None
    fault_tolerance: FaultTolerance | None = None
    metrics = None

    @_undoes_its_start_on_error
    def __init__(self, config: JobConfig, show_progress: bool = True) -> None:
        """Compose the run in stages, each reading its own sections: the runtime (lock, environment,
        process group, mesh, seeds; ``start_runtime``), the data, the model with its gradient sums, the
        step, the checkpoints (a resume happens here), and the launch's records. A stage that fails ends
        what the earlier ones started (``abandon_start``)."""
        self.runtime, (self.tokenizer, windows, validation) = start_runtime(
            config, before_process_group=self._read_data
        )
        config = self.config = self.runtime.config  # resolved (the caller's is left as it is)
        runtime = self.runtime
        self.world, self.dims, self.mesh, self.seeds = runtime.world, runtime.dims, runtime.mesh, runtime.seeds
        self.run_folder, self.run_lock, self.device = runtime.run_folder, runtime.run_lock, runtime.device
        self.comm, self.attention_backend, self.fsdp = runtime.comm, runtime.attention_backend, runtime.fsdp
        # Gradients are summed in the canonical tree, in fp32 (FSDP's reduce dtype, also under bf16); the sums
        # run inside each node first, then across nodes (a hierarchical ring's bytes).
        layout_invariant = config.debug.layout_invariant_reductions
        microbatch = self._start_data(windows, layout_invariant)
        levels = data_parallel_levels(self.mesh, self.dims, self.world.ranks_per_node) if layout_invariant else {}
        self._build_model(layout_invariant, levels, microbatch)
        self.validator = self._validator(*validation) if validation is not None else None
        self._build_step()
        identity = self._checkpoint_identity(windows.fingerprint)
        self.checkpoints = RunCheckpoints(
            config.checkpoint, run_folder=self.run_folder, identity=identity, states=self._checkpoint_states(),
            device=self.device, log=self._log, around_save=self.comm.relaxed,
        )  # fmt: skip
        spec = model_args(config.model, 1, 1)[0]
        fill = functools.partial(self._fill_weights, config.debug.seed)
        resumed = self.checkpoints.start(self.optimizers, spec, self.model.args, self.model.parts, fill)
        if self.fault_tolerance is not None:
            self.fault_tolerance.attach(self.checkpoints.states, self.state.step, shared_settings(identity))
        self._record_start(windows, levels, resumed, show_progress)

    def _start_data(self, windows: TokenWindows, layout_invariant: bool) -> int:
        """The batch sizes, the data loader and (early: the group heartbeats from here on) this replica
        group's torchft manager; returns the loader's microbatch size."""
        config, training = self.config, self.config.training
        # With fault tolerance the global batch spans all replica groups; this group's layout runs blocks of it.
        self.global_batch, self.group_batch = resolve_group_batch_size(config, self.dims)
        self.dp_rank = axis_rank(self.mesh, "dp")
        # Under pipelining the tree's leaves are the schedule's microbatches, so the loader cuts those.
        microbatch = microbatch_size(training, config.parallelism, self.dims)
        self.loader = DataLoader(
            windows,
            seed=self.seeds["data"],
            global_batch=self.global_batch,
            local_batch=microbatch,
            shuffle=config.data.shuffle,
        )
        self.fault_tolerance = (
            self._fault_tolerance(layout_invariant, microbatch) if config.fault_tolerance.enable else None
        )
        self.loader.pin_memory = self.device.type == "cuda"
        if summary := getattr(windows, "summary", None):  # a mixture says how its weights were resolved
            self._log(summary())
        return microbatch

    def _build_model(self, layout_invariant: bool, levels: dict, microbatch: int) -> None:
        """The parallelized model (``build_model``: unfilled, a checkpoint may load over it), the gradient
        tree, the cross-rank reducer and the forward/backward that uses them."""
        config, training = self.config, self.config.training
        loss_fn = global_batch_loss
        if config.compile.enable and "loss" in config.compile.components:
            loss_fn = torch.compile(global_batch_loss)
        pipeline_loss = PipelineLoss(loss_fn, training.loss_chunk_tokens)
        settings = BuildSettings(
            dims=self.dims,
            mesh=self.mesh,
            device=self.device,
            mixed_precision=training.mixed_precision,
            layout_invariant_reductions=layout_invariant,
            fsdp=self.fsdp,
            root_seed=config.debug.seed,
            attention_backend=self.attention_backend,
            deterministic_chunks=deterministic_chunks(config.debug, self.dims),
            reduction_levels=levels,
            fill=False,  # drawn in RunCheckpoints.start unless a checkpoint's model loads over them
        )
        self.model = build_model(
            config.model, activation_checkpoint=config.activation_checkpoint, compile_config=config.compile,
            parallelism=config.parallelism, settings=settings, vocab_size=self.tokenizer.vocab_size,
            seq_len=training.seq_len, pipeline_loss=pipeline_loss,
            num_pipeline_microbatches=self.group_batch // self.dims.dp // config.parallelism.pipeline_parallel_microbatch_size,
        )  # fmt: skip
        for part in self.model.parts:
            if hasattr(part, "set_force_load_balance"):
                part.set_force_load_balance(config.debug.moe_force_load_balance)
        self.moe_blocks = moe_blocks(self.model.parts)
        # FSDP reduce-scatters every micro-step and keeps the tree on the shards (1/dp_shard of the
        # gradients per rank, pipeline stages too); its microbatches are placed strided over the shards.
        self.tree_on_shards = layout_invariant and self.fsdp
        self.microbatch_stride = self.dims.dp_shard if self.tree_on_shards else 1
        self.gradient_tree = canonical_gradient_tree(self.model, self.tree_on_shards) if layout_invariant else None
        self.reducer = CrossRankReducer(
            self.mesh, dims=self.dims, layout_invariant_reductions=layout_invariant, levels=levels
        )
        if self.fault_tolerance is None:  # each rank counts its own samples' tokens: one integer all-reduce
            self.loader.sum_over_ranks = functools.partial(self.reducer.sum_counts, device=self.device)
        self.replica_sum = self.reducer.replica_gradient_sum(
            self.model, config.parallelism.replicate_bucket_mb, fsdp_syncs_once=not self.tree_on_shards
        )
        settings = LossSettings(
            loss_fn, pipeline_loss, training.loss_chunk_tokens,
            loss_parallel=self.dims.tp > 1 and config.parallelism.loss_parallel and not self.model.canonical_tp,
            document_masking=config.data.document_masking, eos_id=self.tokenizer.eos_id,
        )  # fmt: skip
        shard_group = self.mesh.get_group("dp_shard") if self.tree_on_shards and self.dims.dp_shard > 1 else None
        self.forward_backward = ForwardBackward(
            self.model,
            settings=settings,
            device=self.device,
            gradient_tree=self.gradient_tree,
            replica_sum=self.replica_sum,
            shard_group=shard_group,
        )
        self.forward_backward.node_levels = self._replica_nodes(layout_invariant, microbatch)
        self.forward_backward.replica = axis_rank(self.mesh, "dp_replicate")
        self.named_params = [(n, p) for part in self.model.parts for n, p in part.named_parameters() if p.requires_grad]

    def _build_step(self) -> None:
        """The optimizers and schedules (one per pipeline stage: checkpoints keep optimizer state by
        parameter name per stage), the train state, the guards, the profiler, and the step object."""
        config, training = self.config, self.config.training
        self.optimizers = [build_optimizer(_trainable(part), config.optimizer) for part in self.model.parts]
        self.lr_schedulers = [build_lr_scheduler(o, config.lr_scheduler, training.steps) for o in self.optimizers]
        self.state = TrainState()
        self.guards = StepGuards(
            config.debug,
            loss_window=self.state.loss_window,
            run_folder=self.run_folder,
            writes=self.world.is_main,
            log=self._log,
        )
        self.place = StepPlace(
            self.dp_rank, self.dims.dp, self.microbatch_stride, self.model.pipeline is not None,
            [self.reducer.dp_group, self.reducer.pp_group],
        )  # fmt: skip
        self.profiler = Profiler(config.profiling, run_folder=self.run_folder, rank=self.world.rank, device=self.device)
        timeline = memory_timeline(
            config.profiling, run_folder=self.run_folder, rank=self.world.rank, device=self.device
        )
        self.step_metrics = StepMetrics(self.device, timeline=timeline)
        self.step = TrainStep(
            self._gradient_source(),
            model=self.model, forward_backward=self.forward_backward, reducer=self.reducer, optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers, guards=self.guards, step_metrics=self.step_metrics, loader=self.loader,
            place=self.place, max_norm=training.max_norm, fingerprint_outputs=not config.compile.enable,
            device=self.device, sample_losses_available=self.fault_tolerance is None,
        )  # fmt: skip

    def _record_start(self, windows: TokenWindows, levels: dict, resumed: bool, show_progress: bool) -> None:
        """The launch's records (rank 0: launches/NNN, config.toml, env.json with the parameter counts, the
        metrics sinks), the console display and the step recorder."""
        config, training = self.config, self.config.training
        env = self.runtime.environment_record(
            fingerprints={"dataset": windows.fingerprint, "tokenizer": self.tokenizer.fingerprint},
            reduction_levels=levels,
        )
        env["parameters"] = parameter_counts(model_spec(config.model.name), self.model.args)
        self._log(f"model {config.model.name} {config.model.flavor}: {describe_parameters(env['parameters'])}")
        if config.model.overrides:  # what the flavor and the overrides resolved to, every field
            self._log(f"model args: {asdict(self.model.args)}")
        self.metrics, self.launch = None, None
        if self.world.is_main:  # rank 0 writes the run folder and prints
            self.launch, self.metrics = record_launch(
                self.run_folder, config_toml=dump_toml(config), env=env, start_step=self.state.step,
                resumed_from=self.checkpoints.resumed_from, resumed_at=self.state.step if resumed else None,
                metrics=config.metrics,
                log=self._log if show_progress else lambda message: None,  # eval, audit: a scratch run, no launch to tell
            )  # fmt: skip
        self.display = ConsoleDisplay(training.steps, self.state.step, enabled=show_progress and self.world.is_main)
        self.events = LaunchEvents(self.display.print, self.launch)
        self.recorder = StepRecorder(
            config.metrics,
            loader=self.loader,
            step_metrics=self.step_metrics,
            rank_fingerprints=RankFingerprints(self.run_folder, self.world.rank),
            flops_per_token=self.model.flops_per_token,
            peak_flops=peak_flops(
                self.device, training.mixed_precision, cache_root(config.data.cache_folder) / "peak_flops.json"
            ),
            world_size=self.world.world_size,
            # Stages hold different MoE layers: their statistics are pooled over the pipeline.
            moe_group=self.reducer.pp_group if getattr(self.model.args, "n_routed_experts", 0) else None,
            replica_groups=self.fault_tolerance,
        )

    def _read_data(self, runtime: Runtime) -> tuple[Tokenizer, TokenWindows, tuple | None]:
        """The tokenizer, the training windows and the held-out ones, before the process group is up
        (tokenizing runs once per machine, under a file lock, so no collective waits on it; a multi-node
        job must train on data prepared before the launch)."""
        config, world = runtime.config, runtime.world
        tokenizer = build_tokenizer(config.model, config.data)
        nodes = max(1, world.world_size // max(1, world.ranks_per_node))
        windows = build_token_windows(config.training, config.data, tokenizer, nodes=nodes)
        if not config.validation.enable:
            return tokenizer, windows, None
        batches = resolve_validation(config, runtime.dims)
        held_out = validation_windows(
            config.validation, config.data, tokenizer, batches.seq_len, nodes, training=config.training
        )
        return tokenizer, windows, (batches, held_out)

    def _fill_weights(self, root_seed: int) -> None:
        for part in self.model.parts:
            part.fill_weights(root_seed)

    def _fault_tolerance(self, layout_invariant: bool, microbatch: int):
        """Built from the fault_tolerance section, early (the group heartbeats from here on): this group's
        torchft manager; each group computes blocks of group_batch samples."""
        level = (self.group_batch // microbatch).bit_length() - 1  # blocks of 2^level microbatches
        return FaultTolerance(
            self.config.fault_tolerance,
            world=self.world,
            device=self.device,
            block_samples=self.group_batch,
            block_level=level,
            layout_invariant_reductions=layout_invariant,
            run_folder=self.run_folder,
        )

    def _gradient_source(self) -> GradientSource:
        """Where a step's gradients come from: this job's ranks over the whole global batch, or this
        replica group's blocks summed with the live groups' (fault tolerance)."""
        passes = GroupPasses(self.forward_backward, reducer=self.reducer, step_metrics=self.step_metrics)
        if self.fault_tolerance is None:
            return LocalGradients(self.loader, place=self.place, passes=passes, global_batch=self.global_batch)
        return ReplicaGroupGradients(
            self.fault_tolerance, loader=self.loader, place=self.place, passes=passes,
            params=[p for _, p in self.named_params], counters=[moe.tokens_per_expert for _, moe in self.moe_blocks],
        )  # fmt: skip

    def _replica_nodes(self, layout_invariant: bool, microbatch: int) -> list[list[int]] | None:
        """When each replica's block of K microbatches (K not a power of two, no FSDP sharding) is not
        one node of the canonical tree: the nodes of every replica's block (canonical_nodes)."""
        per_rank = self.group_batch // microbatch // self.dims.dp
        if (
            not layout_invariant
            or self.dims.dp_replicate == 1
            or self.dims.dp_shard > 1
            or per_rank & (per_rank - 1) == 0
        ):
            return None
        return [canonical_nodes(r * per_rank, per_rank) for r in range(self.dims.dp_replicate)]

    def _validator(self, batches: ValidationBatches, windows: TokenWindows) -> Validator:
        """Built from the validation section; it evaluates through the same forward as training."""
        config = self.config
        groups = [self.reducer.dp_group, self.reducer.pp_group]
        summed_losses = self.forward_backward.summed_losses
        return Validator(
            config.validation,
            windows=windows,
            batches=batches,
            dp_rank=self.dp_rank,
            dp_degree=self.dims.dp,
            summed_losses=summed_losses,
            groups=groups,
            device=self.device,
        )

    def _checkpoint_identity(self, dataset_fingerprint: str) -> dict:
        """What a resumed checkpoint must match (the layout is recorded but may differ)."""
        config = self.config
        return {
            "model": {"name": config.model.name, "flavor": config.model.flavor, "args": asdict(self.model.args)},
            "fingerprints": {"dataset": dataset_fingerprint, "tokenizer": self.tokenizer.fingerprint},
            "layout": dict(zip(AXES, self.dims.sizes(), strict=True)),
            "config": config_record(dump_toml(config), self.global_batch),  # what a resume compares its config with
            "model_overrides": config.model.overrides,  # recorded (the args above are what must match)
        }

    def _checkpoint_states(self) -> dict:
        return {
            "model": ModelState(self.model.parts),
            "optimizer": OptimizerState(self.model.parts, self.optimizers),
            "lr_scheduler": SchedulerState(self.lr_schedulers),
            "dataloader": ObjectState(
                self.loader,
                check_on_load=not self.config.checkpoint.ignore_mismatch,
                optional=("order_version", "shuffle"),
            ),
            "train_state": ObjectState(self.state, optional=("elapsed_s", "loss_window")),  # added after format 2
            "rng": RNGState(axis_rank(self.mesh, "pp"), self.device),
        }

    def train_step(
        self,
        fingerprint: bool = False,
        observe: Callable[[str, dict], None] | None = None,
        stop_requested: bool = False,
    ) -> StepResult:
        """The next step through ``self.step`` (lockstep.train.step.TrainStep); the state is not moved
        (the loop does that with TrainState.advance)."""
        return self.step.run(
            self.state.step + 1, fingerprint=fingerprint, observe=observe, stop_requested=stop_requested
        )

    def sample_losses(self, step_start: int) -> SampleLosses | None:
        """TrainStep.sample_losses: each sample's loss of the global batch starting at `step_start`."""
        return self.step.sample_losses(step_start)

    def close(self, failed: bool = False) -> None:
        """Tear down the process group (after any last collective, e.g. full_weights); after a
        failure without the closing barrier, so this rank exits promptly whatever its peers do."""
        if self.run_lock is not None and not self.checkpoints.saving:  # see _end_launch
            self.run_lock.release()
        if getattr(self, "fault_tolerance", None) is not None:
            self.fault_tolerance.close()
        destroy_process_group(barrier=not failed)

    def abandon_start(self) -> None:
        """End what a failed __init__ started, each step even if an earlier one fails."""
        undo = [
            lambda: self.metrics is not None and self.metrics.close(),
            lambda: self.fault_tolerance is not None and self.fault_tolerance.close(),
            lambda: self.runtime is not None and self.runtime.abandon(),
        ]
        for step in undo:
            with contextlib.suppress(Exception):
                step()

    def _end_launch(self) -> None:
        """Record where this launch ended and release the run folder: the run writes nothing more. An
        async save still in flight (the loop ended by an error) keeps the lock until the process exits,
        so no other run can prune its .partial folder meanwhile."""
        if self.launch is not None:
            self.launch.finish(self.state.step, completed=self.state.step >= self.config.training.steps)
        if self.run_lock is not None and not self.checkpoints.saving:
            self.run_lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(failed=exc_type is not None)

    def full_weights(self) -> dict[str, torch.Tensor]:
        """This rank's parameters as full tensors (DTensors gathered), for tests and tools."""
        return {
            name: full_value(p).detach().cpu().clone()
            for part in self.model.parts
            for name, p in part.named_parameters()
        }

    def train(self) -> Path:
        """Train to training.steps (or until SIGTERM/Ctrl-C); returns the run folder."""
        training, steps = self.config.training, self.config.training.steps
        self.display.print(f"run folder {self.run_folder}  seed {self.config.debug.seed}  device {self.device}")
        if self.state.step >= steps and not self.config.checkpoint.create_seed_checkpoint:
            self.display.print(
                f"{self.run_folder} is finished: it resumed at step {self.state.step} and training.steps is {steps}; "
                "raise --training.steps to train on, or pass another --job.dump_folder to start anew"
            )
        self.recorder.restart_interval()
        if self.config.checkpoint.create_seed_checkpoint:
            self.display.print(f"seed checkpoint written to {self.checkpoints.save_seed()}")
            self.display.close()
            self._end_launch()
            return self.run_folder
        with GracefulStop().installed() as stop:
            try:
                stopping, reason = False, ""
                clock = time.perf_counter() - self.state.elapsed_s  # continues the run's earlier launches
                self.profiler.start(self.state.step)
                while self.state.step < steps and not stopping:
                    # The step's quorum under fault tolerance; a group that is behind heals here.
                    try:
                        healed = self.fault_tolerance is not None and self.fault_tolerance.start_step()
                    except LighthouseLost as lost:  # save the last committed step, then stop (exit 75)
                        self.checkpoints.save_if_due(self.state.step, steps, True, self.model.parts)
                        reason, stopping = str(lost), True
                        break
                    if healed:
                        clock = time.perf_counter() - self.state.elapsed_s  # the healed run's time
                        self.events.healed(self.state.step)
                        if self.state.step >= steps:
                            break
                    lr = self.lr_schedulers[0].get_last_lr()[0]
                    step = self.state.step + 1
                    # A hung peer ends the step within comm.train_timeout_seconds, naming the collective.
                    with self.comm.watching(step), self.profiler.step(step):
                        fingerprint = self.config.debug.fingerprint and self.recorder.due(step, steps, False)
                        result = self.train_step(fingerprint, stop_requested=stop.requested)
                        if not result.committed:  # redone with the next quorum, unless asked to stop
                            if result.stop:  # save the last committed step (if this launch has not yet)
                                self.checkpoints.save_if_due(self.state.step, steps, True, self.model.parts)
                            stopping = result.stop
                            continue
                        self.state.advance(result.samples * training.seq_len, time.perf_counter() - clock)
                        self.recorder.count(result.samples * training.seq_len)
                        # Read once, agreed by all ranks: every rank stops after the same step, which is logged.
                        stopping = result.stop
                        evaluate = self.validator is not None and not stopping and self.validator.due(step, steps)
                        if evaluate or self.recorder.due(self.state.step, steps, stopping):
                            record = self.recorder.record(result, state=self.state, lr=lr)
                            if evaluate:  # after the throughput is taken, which evaluation time must not lower
                                with self.comm.relaxed():
                                    record |= self.validator.evaluate().as_record()
                            if self.metrics is not None:
                                self.metrics.log(record)
                            self.display.print(format_record(record))
                            self.recorder.restart_interval()
                        self.checkpoints.save_if_due(self.state.step, steps, stopping, self.model.parts)
                        self.display.step(self.state.step, result.loss_value)
                    self.comm.step_done(step)
                self.checkpoints.close()
                outcome = self.events.stopped(
                    self.state.step, stopping=stopping, saved_step=self.checkpoints.saved_step, reason=reason
                )
                self.stopped_by_signal, self.stop_saved = outcome.stopped, outcome.saved
            finally:
                self.profiler.stop()
                if self.metrics is not None:
                    self.metrics.close()
                self.display.close()
                self._end_launch()
        return self.run_folder

    def _log(self, message: str) -> None:
        if self.world.is_main:
            print(message, flush=True)
