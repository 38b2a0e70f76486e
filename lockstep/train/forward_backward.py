"""This rank's forward and backward over one step's microbatches, and the step's loss in canonical order.

Two drivers share everything else: the trainer's own loop over microbatches, or one step of a
pipeline schedule (which cuts this rank's samples into pipeline microbatches). Gradients land
wherever the gradient hooks were placed (lockstep.parallel.canonical.GradientTree,
lockstep.parallel.replicate.ReplicaGradientSum); what comes back here is the loss, summed over this
rank's microbatches as the same subtree every layout computes. The validator's forward-only pass
(``summed_losses``) goes through the same path, so it sees what training sees.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from lockstep.data.loader import Microbatch
from lockstep.models.common.masks import AttentionMasks
from lockstep.parallel.canonical import GradientTree, TreeSum, shard_block_loss
from lockstep.parallel.parallelize import BuiltModel
from lockstep.parallel.replicate import ReplicaGradientSum
from lockstep.train.loss import ChunkedLossHead, PipelineLoss


@dataclass
class LossSettings:
    """How a microbatch's loss is taken, resolved once by the trainer."""

    loss_fn: object
    """global_batch_loss, or its compiled form."""
    pipeline_loss: PipelineLoss
    chunk_tokens: int
    """training.loss_chunk_tokens: the model takes the loss itself, a chunk of tokens at a time."""
    loss_parallel: bool
    """The TP plan leaves the logits vocab-sharded: forward and backward run in loss_parallel()."""
    document_masking: bool
    eos_id: int


def canonical_gradient_tree(model: BuiltModel, tree_on_shards: bool) -> GradientTree:
    """The canonical per-microbatch gradient tree, hooked where each microbatch's gradient lands: the
    sharded FSDP parameters (reduce-scattered every micro-step, pipeline stages included) and the
    parameters FSDP ignores, or the parameters themselves."""
    tree = GradientTree()
    if tree_on_shards:
        tree.watch_sharded(model.fsdp_modules)
        tree.watch(model.unmanaged_params)
    else:
        tree.watch(p for part in model.parts for p in part.parameters())
    return tree


class ForwardBackward:
    def __init__(
        self,
        model: BuiltModel,
        *,
        settings: LossSettings,
        device: torch.device,
        gradient_tree: GradientTree | None,
        replica_sum: ReplicaGradientSum | None,
        shard_group: dist.ProcessGroup | None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.device = device
        self.gradient_tree = gradient_tree
        self.replica_sum = replica_sum
        self.shard_group = shard_group
        """Set when the tree is kept on FSDP's shards: microbatches are placed strided over this group,
        so the replica's losses are gathered over it and summed in block order."""
        self.node_levels: list[list[int]] | None = None
        """Set when each replica's block is several nodes of the canonical tree (``canonical_nodes``, one
        list per replica): gradients and losses are kept per node for the sum across replicas."""
        self.replica = 0
        """This rank's replica index (which of node_levels is its own)."""

    def masks(self, inputs: torch.Tensor, deferred: bool = False) -> AttentionMasks | None:
        if not self.settings.document_masking:
            return None
        return self.model.parts[0].get_attention_masks(inputs, self.settings.eos_id, deferred)

    def _contexts(self):
        stack = contextlib.ExitStack()
        if self.settings.loss_parallel:  # cross-entropy and its backward on the vocabulary shards
            stack.enter_context(loss_parallel())
        return stack

    def run(self, microbatches: list[Microbatch], global_tokens: int) -> torch.Tensor:
        """Forward and backward of this rank's microbatches; returns their loss ([1], tree order; 0 on
        pipeline stages without the loss)."""
        pipeline = self.model.pipeline
        count = len(microbatches) if pipeline is None else pipeline.num_microbatches
        mine = self.node_levels[self.replica] if self.node_levels is not None else None
        if self.replica_sum is not None:
            nodes_of = self.gradient_tree.nodes if self.gradient_tree is not None else None
            self.replica_sum.begin_step(count, self.node_levels, nodes_of)
        if self.gradient_tree is not None:
            self.gradient_tree.begin_step(count, mine)
        if pipeline is None:
            losses = self._train_loop(microbatches, global_tokens)
        else:
            losses = self._pipeline_losses(microbatches, global_tokens, evaluate=False)
        if self.gradient_tree is not None:
            self.gradient_tree.check_complete()
        if losses is None:
            return torch.zeros(len(mine) if mine else 1, device=self.device)
        if mine:  # one loss per node of this replica's block
            sizes = [1 << level for level in mine]
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            return torch.cat([self._tree(losses[s : s + n]) for s, n in zip(starts, sizes, strict=True)])
        if self.shard_group is not None:  # placed strided (a last stage's shard group is all last stages)
            return shard_block_loss(torch.cat(losses), self.shard_group).reshape(1)
        return self._tree(losses)

    @staticmethod
    def _tree(losses: list[torch.Tensor]) -> torch.Tensor:
        total = TreeSum()
        for microbatch_loss in losses:
            total.add([microbatch_loss])
        return total.result()[0]

    def summed_losses(self, microbatches: list[Microbatch]) -> list[torch.Tensor] | None:
        """Each microbatch's summed cross-entropy, forward only (the validator's forward): the training
        loss with a denominator of 1, through the pipeline schedule's eval when pipelined."""
        if self.model.pipeline is not None:
            return self._pipeline_losses(microbatches, 1, evaluate=True)
        losses = []
        for mb in microbatches:
            inputs, labels = mb.inputs.to(self.device, non_blocking=True), mb.labels.to(self.device, non_blocking=True)
            with self._contexts():
                losses.append(self._microbatch_loss(inputs, labels, 1).float().reshape(1))
        return losses

    def _train_loop(self, microbatches: list[Microbatch], global_tokens: int) -> list[torch.Tensor]:
        """FSDP's gradient sync stays on: each micro-step's gradients are reduce-scattered during its
        backward, and with the tree on the shards the hooks sum the shards over micro-steps."""
        losses = []
        for mb in microbatches:
            inputs, labels = mb.inputs.to(self.device, non_blocking=True), mb.labels.to(self.device, non_blocking=True)
            with self._contexts():
                microbatch_loss = self._microbatch_loss(inputs, labels, global_tokens)
                microbatch_loss.backward()
            losses.append(microbatch_loss.detach().reshape(1))
        return losses

    def _microbatch_loss(self, inputs: torch.Tensor, labels: torch.Tensor, global_tokens: int) -> torch.Tensor:
        """The microbatch's share of the global-batch loss; with loss chunking the model runs the loss
        itself, a chunk of tokens at a time (eager), so no [B, S, vocab] logits exist."""
        model, chunk_tokens = self.model.parts[0], self.settings.chunk_tokens
        if not chunk_tokens:
            return self.settings.loss_fn(model(inputs, self.masks(inputs)), labels, global_tokens)
        return model(inputs, self.masks(inputs), head=ChunkedLossHead(labels, global_tokens, chunk_tokens))

    def _pipeline_losses(
        self, microbatches: list[Microbatch], global_tokens: int, evaluate: bool
    ) -> list[torch.Tensor] | None:
        """One schedule step over this rank's samples (forward only with `evaluate`); the last stage
        returns each pipeline microbatch's loss (fp32, [1]), the other stages None."""
        pipeline, pipeline_loss = self.model.pipeline, self.settings.pipeline_loss
        inputs = torch.cat([mb.inputs for mb in microbatches]).to(self.device, non_blocking=True)
        labels = torch.cat([mb.labels for mb in microbatches]).to(self.device, non_blocking=True)
        masks = self.masks(inputs, deferred=True)  # each stage builds one microbatch's mask at a time
        kwargs = {} if masks is None else {"attention_masks": masks}
        pipeline_loss.global_tokens = global_tokens
        if (head := pipeline_loss.head(labels)) is not None:  # split by microbatch like the masks
            kwargs["head"] = head  # the last stage returns the chunked loss, never the logits
        losses: list[torch.Tensor] = []
        target = labels if pipeline.has_last_stage else None
        args = (inputs,) if pipeline.has_first_stage else ()
        with self._contexts():
            if evaluate:
                pipeline.schedule.eval(*args, target=target, losses=losses, **kwargs)
            else:  # return_outputs=False: the schedule keeps no microbatch's last-stage output (logits)
                pipeline.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        if not pipeline.has_last_stage:
            return None
        return [microbatch_loss.detach().float().reshape(1) for microbatch_loss in losses]
