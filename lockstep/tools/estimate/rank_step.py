"""One rank's training step, composed from the trainer's own pieces, for the estimator and its checks.

``RankStep`` builds what ``Trainer.__init__`` builds for the step (the layout, ``build_model`` with the
parallelize order, the canonical gradient tree, the replica sum, ``ForwardBackward``, the optimizers)
from the same config sections, and runs what ``Trainer._step`` runs: forward and backward of the
rank's microbatches, the replica sum, the global loss, the fp64 grad norm, clipping and the optimizer
step. ``lockstep estimate`` runs it on a fake process group over fake tensors; the checks run it on
real gloo ranks over real tensors, and compare the two.

The data are all-zero token windows (every token one document, the largest attention masks); the
memory of a step does not depend on token values except through routing, which the estimate takes
as balanced (``debug.moe_force_load_balance``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lockstep.config import JobConfig
from lockstep.config.job import ParallelDims, deterministic_chunks, microbatch_size, resolve_group_batch_size
from lockstep.data.loader import Microbatch
from lockstep.parallel.canonical import clip_, grad_norm_fp64, sharded_parameters
from lockstep.parallel.mesh import axis_rank, build_mesh
from lockstep.parallel.node_levels import data_parallel_levels
from lockstep.parallel.parallelize import BuildSettings, BuiltModel, build_model
from lockstep.parallel.reducer import CrossRankReducer
from lockstep.train.forward_backward import ForwardBackward, LossSettings, canonical_gradient_tree
from lockstep.train.loss import PipelineLoss, global_batch_loss
from lockstep.train.optimizer import build_optimizer


@dataclass
class StepShape:
    """How the rank's share of the global batch is cut (the trainer's rules)."""

    microbatch: int
    """Samples per microbatch (under pipelining the schedule's microbatch)."""
    microbatches: int
    """Microbatches this rank runs per step (under pipelining: the schedule's count)."""
    seq_len: int

    @classmethod
    def of(cls, config: JobConfig, dims: ParallelDims) -> StepShape:
        _, group_batch = resolve_group_batch_size(config, dims)
        microbatch = microbatch_size(config.training, config.parallelism, dims)
        return cls(microbatch, group_batch // dims.dp // microbatch, config.training.seq_len)


class RankStep:
    """The step of the calling rank of the current (real or fake) default process group."""

    def __init__(
        self,
        config: JobConfig,
        dims: ParallelDims,
        *,
        vocab_size: int,
        device: torch.device,
        attention_backend: str,
        ranks_per_node: int,
        tensor_mode: contextlib.AbstractContextManager | None = None,
        on_gradient: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """With `tensor_mode` (the estimate's FakeTensorMode) the model is built on the meta device and
        materialised inside that mode, unfilled; otherwise the trainer's seeded initial values are drawn.
        `on_gradient(param)` sees each parameter once its gradient has landed (before the tree takes it)."""
        self.config, self.dims, self.device = config, dims, device
        self.shape = StepShape.of(config, dims)
        self.eos_id = vocab_size - 1
        layout_invariant = config.debug.layout_invariant_reductions
        fsdp = dims.fsdp or config.training.mixed_precision == "bf16"
        self.mesh = build_mesh(dims, device, single=fsdp)
        training = config.training
        pipeline_loss = PipelineLoss(global_batch_loss, training.loss_chunk_tokens)
        levels = data_parallel_levels(self.mesh, dims, ranks_per_node) if layout_invariant else {}
        settings = BuildSettings(
            dims=dims,
            mesh=self.mesh,
            device=device,
            mixed_precision=training.mixed_precision,
            layout_invariant_reductions=layout_invariant,
            fsdp=fsdp,
            root_seed=config.debug.seed or 0,
            attention_backend=attention_backend,
            deterministic_chunks=deterministic_chunks(config.debug, dims),
            initialize=tensor_mode is None,
            reduction_levels=levels,
        )
        self.model: BuiltModel = build_model(
            config.model, activation_checkpoint=config.activation_checkpoint, compile_config=config.compile,
            parallelism=config.parallelism, settings=settings, vocab_size=vocab_size, seq_len=training.seq_len,
            pipeline_loss=pipeline_loss, num_pipeline_microbatches=self.shape.microbatches if dims.pp > 1 else 0,
        )  # fmt: skip
        if tensor_mode is not None:
            with tensor_mode:
                for part in self.model.parts:
                    part.materialize(device)
        for part in self.model.parts:
            if hasattr(part, "set_force_load_balance"):
                part.set_force_load_balance(True)
        tree_on_shards = layout_invariant and fsdp
        if on_gradient is not None:  # registered first, so it runs before the tree's hooks
            watched = [p for module in self.model.fsdp_modules for p in sharded_parameters(module)]
            watched += [p for part in self.model.parts for p in part.parameters()]
            for param in {id(p): p for p in watched}.values():
                param.register_post_accumulate_grad_hook(on_gradient)
        self.gradient_tree = canonical_gradient_tree(self.model, tree_on_shards) if layout_invariant else None
        self.reducer = CrossRankReducer(
            self.mesh, dims=dims, layout_invariant_reductions=layout_invariant, levels=levels
        )
        self.replica_sum = self.reducer.replica_gradient_sum(
            self.model, config.parallelism.replicate_bucket_mb, fsdp_syncs_once=not tree_on_shards
        )
        settings = LossSettings(
            global_batch_loss, pipeline_loss, training.loss_chunk_tokens,
            loss_parallel=dims.tp > 1 and config.parallelism.loss_parallel and not self.model.canonical_tp,
            document_masking=config.data.document_masking, eos_id=self.eos_id,
        )  # fmt: skip
        shard_group = self.mesh.get_group("dp_shard") if tree_on_shards and dims.dp_shard > 1 else None
        self.forward_backward = ForwardBackward(
            self.model,
            settings=settings,
            device=device,
            gradient_tree=self.gradient_tree,
            replica_sum=self.replica_sum,
            shard_group=shard_group,
        )
        self.forward_backward.replica = axis_rank(self.mesh, "dp_replicate")
        self.named_params = [(n, p) for part in self.model.parts for n, p in part.named_parameters() if p.requires_grad]
        self.optimizers = [
            build_optimizer([(n, p) for n, p in part.named_parameters() if p.requires_grad], config.optimizer)
            for part in self.model.parts
        ]

    def microbatches(self) -> list[Microbatch]:
        shape = self.shape
        window = torch.zeros(shape.microbatch, shape.seq_len, dtype=torch.long, device="cpu")
        return [Microbatch(window, window.clone()) for _ in range(shape.microbatches)]

    def create_optimizer_state(self) -> None:
        """AdamW's state exists from the second step on: make it (an update with zero gradients) so that
        the step that follows is a steady one."""
        for _, param in self.named_params:
            param.grad = torch.zeros_like(param)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> list[torch.Tensor]:
        return [t for o in self.optimizers for state in o.state.values() for t in state.values() if t.dim() > 0]

    def run(self, optimizer_phase: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        """One optimizer step, as ``Trainer._step`` runs it (no fault tolerance, no guards)."""
        microbatches = self.microbatches()
        global_tokens = self.shape.microbatch * self.shape.seq_len * self.shape.microbatches * self.dims.dp
        loss = self.forward_backward.run(microbatches, global_tokens)
        if self.replica_sum is not None:
            self.replica_sum.finish()
        self.reducer.global_loss(loss, self.forward_backward.node_levels)
        named_grads = {n: p.grad for n, p in self.named_params if p.grad is not None}
        grad_norm = grad_norm_fp64(named_grads, self.model.param_names, self.reducer.pp_group)
        with optimizer_phase():
            if self.config.training.max_norm > 0:
                clip_(list(named_grads.values()), grad_norm, self.config.training.max_norm)
            for optimizer in self.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
