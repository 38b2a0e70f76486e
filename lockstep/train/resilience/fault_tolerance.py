"""Replica groups that survive failures without changing the numbers, over torchft.

Each replica group is an ordinary lockstep job (one or more ranks, any layout inside). Built from the
fault_tolerance section, this object holds the group's torchft ``Manager`` (its quorum with the other
groups through the lighthouse, and a process group over them that torchft reconfigures when groups
come and go) and runs a step's gradients across groups:

- ``start_step`` asks for the step's quorum before any work, synchronously: a group that is behind
  (restarted) heals there, receiving a live group's full state (lockstep.train.resilience.healing), and the
  group knows which groups take part before it picks its microbatches.
- ``step_gradients`` computes this group's blocks of the global batch (lockstep.parallel.block_sum):
  with ``keep_global_batch`` the batch keeps its group_size blocks and the live groups share all of
  them, so a committed step is bitwise the step of a run that never failed; without it, the step
  shrinks to one block per live group (torchft's own behaviour). Block sums cross groups through the
  manager's all-reduce, in the canonical order.
- ``commit`` is torchft's vote: a step whose cross-group sum failed, or whose quorum broke, is not
  committed; the trainer rewinds the loader and the next quorum redoes it.

Quorum changes, uncommitted steps and heals go to ``faults.jsonl`` in the group's run folder.

The manager is created early in a launch, before the model is built, so the group heartbeats to the
lighthouse from then on. The lighthouse forms no quorum of half or fewer of the heartbeating groups
(torchft's split-brain rule), so two groups started together begin together; more may begin as a
majority, the others healing when they join. At every new quorum the groups check that they run the
same settings (those that change the numbers, the layout, the data): a mismatch stops the run.

Fault drills: ``LOCKSTEP_FT_KILL_IN_SUM=K`` makes the group kill itself (SIGKILL) in its K-th
cross-group sum, while the other groups wait in it. ``LOCKSTEP_FT_HOLD=STEP:PATH`` holds the group
before the quorum of step STEP until PATH exists (it keeps heartbeating, so no quorum forms without
it): a drill can restart another group meanwhile and know that it will heal.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torch.distributed import ReduceOp
from torchft import Manager
from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

from lockstep.config.sections import FaultToleranceConfig
from lockstep.data.loader import Microbatch
from lockstep.errors import LockstepError
from lockstep.parallel.block_sum import blocks_of, combine_blocks
from lockstep.parallel.canonical import local_tensor
from lockstep.parallel.process_group import WorldInfo
from lockstep.run.jsonl import JsonlWriter
from lockstep.train.resilience.healing import HealingState, SafeHTTPTransport

KILL_IN_SUM_ENV = "LOCKSTEP_FT_KILL_IN_SUM"
HOLD_ENV = "LOCKSTEP_FT_HOLD"


class LighthouseLost(LockstepError):
    """No quorum could be formed: the lighthouse is gone or unreachable (or every other group with it).
    The trainer saves the last committed step before it stops on this (exit 75: restart the lighthouse,
    then rerun the same command to resume)."""

    def __init__(self, lighthouse: str, error: BaseException, *, at_start: bool, quorum_timeout_s: float) -> None:
        self.lighthouse = lighthouse
        message = re.search(r'message: "([^"]*)"', str(error))  # a gRPC status: its message says it all
        cause = message.group(1) if message else str(error).split(";")[0].split(": transport error")[0][:160]
        if at_start:
            what = f"cannot reach the torchft lighthouse at {lighthouse} ({cause})"
            fix = "start it first (lockstep lighthouse) or fix fault_tolerance.lighthouse / $TORCHFT_LIGHTHOUSE"
        else:
            what = f"the torchft lighthouse at {lighthouse} gave no quorum within {quorum_timeout_s:g} s ({cause})"
            fix = "restart it (lockstep lighthouse) and rerun the same command to resume"
        super().__init__(f"fault_tolerance.lighthouse: {what}; {fix}")


QUORUM_FAILURES = (TimeoutError, RuntimeError, ConnectionError)
"""What torchft's Manager raises when the lighthouse (or the group's manager server) cannot be reached."""


ReadBlocks = Callable[[tuple[int, ...], int, int | None], tuple[list[list[Microbatch]], int]]
"""(blocks, number of blocks, step samples or None for the global batch) -> per-block microbatches,
valid tokens of the step (DataLoader.next_blocks for this rank)."""
ComputeBlock = Callable[[list[Microbatch], int], torch.Tensor]
"""(a block's microbatches, the step's valid tokens) -> the block's loss, on every rank of the group,
with the block's gradients (summed over the group) in the parameters' .grad."""


def _recording(process_group: type) -> type:
    class Recording(process_group):
        """torchft's process group over replica groups, remembering which groups the quorum holds."""

        replica_ids: list[int] = []

        def configure(self, store_addr, replica_id, rank, world_size, quorum_id=None, group_rank=None,
                      group_world_size=None, global_ranks=None) -> None:  # fmt: skip
            super().configure(
                store_addr, replica_id, rank, world_size, quorum_id, group_rank, group_world_size, global_ranks
            )
            if global_ranks is not None and group_world_size:
                self.replica_ids = sorted(r // group_world_size for r in global_ranks)

    return Recording


class FaultLog:
    """faults.jsonl: one JSON line per quorum change, uncommitted step and heal (rank 0 of a group)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, event: str, step: int, **fields) -> None:
        if self.path is None:
            return
        record = {"event": event, "step": step, "time": time.time()} | fields
        JsonlWriter(self.path).append(record)


class FaultTolerance:
    def __init__(
        self,
        config: FaultToleranceConfig,
        *,
        world: WorldInfo,
        device: torch.device,
        block_samples: int,
        block_level: int,
        layout_invariant_reductions: bool,
        run_folder: Path,
    ) -> None:
        self.config = config
        self.block_samples = block_samples
        """Samples in one group's block of a step (the global batch over group_size)."""
        self.block_level = block_level
        """Each block is 2^block_level of the loader's microbatches."""
        self.layout_invariant_reductions = layout_invariant_reductions
        self.healing = HealingState({})  # the checkpoint's parts, once built (attach)
        timeout = timedelta(seconds=config.timeout_s)
        process_group = _recording(ProcessGroupNCCL if device.type == "cuda" else ProcessGroupGloo)(timeout=timeout)
        self.process_group = process_group
        self._own_store = None
        store_addr, store_port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        lighthouse = config.lighthouse_address()
        host = urlparse(lighthouse if "://" in lighthouse else f"http://{lighthouse}").hostname or ""
        # What other groups dial: loopback when the lighthouse is on this machine (a one-machine run).
        advertised = "127.0.0.1" if host in ("localhost", "127.0.0.1", "::1") else _hostname()
        if store_addr is None or store_port is None:  # one process without torchrun: the group's own store
            self._own_store = torch.distributed.TCPStore(advertised, 0, is_master=True, wait_for_workers=False)
            store_addr, store_port = advertised, str(self._own_store.port)
        self.lighthouse = lighthouse
        try:
            self.manager = Manager(
                pg=process_group,
                load_state_dict=lambda state: self.healing.load_state_dict(state),
                state_dict=lambda: self.healing.state_dict(),
                min_replica_size=config.min_replica_size,
                use_async_quorum=False,  # the quorum (and any heal) completes before the step picks its blocks
                timeout=timeout,
                quorum_timeout=timedelta(seconds=config.quorum_timeout_s),
                connect_timeout=timeout,
                rank=world.rank,
                world_size=world.world_size,
                store_addr=store_addr,
                store_port=int(store_port),
                lighthouse_addr=lighthouse,
                replica_id=f"replica_{config.replica_id}",
                hostname=advertised,
                checkpoint_transport=SafeHTTPTransport(timeout=timeout, num_chunks=0),
                init_sync=False,  # every group initialises the same weights from the seed
            )
        except QUORUM_FAILURES as error:
            raise LighthouseLost(lighthouse, error, at_start=True, quorum_timeout_s=config.quorum_timeout_s) from None
        self.log = FaultLog(run_folder / "faults.jsonl" if world.is_main else None)
        kill_at = os.environ.get(KILL_IN_SUM_ENV, "")
        self._kill_in_sum = int(kill_at) if kill_at else None
        self._sums = 0
        self._replicas: list[int] = []
        self.participants = 0
        self.participant = 0
        self.step_samples = 0
        """Samples of the last step computed (the global batch, unless it shrank with the live groups)."""
        self.last_heal_s = math.nan
        self._settings = torch.zeros(8, dtype=torch.int32)

    def attach(self, states: dict, step: int, settings: dict) -> None:
        """What a heal sends and receives (the checkpoint's parts), the step this launch starts from (a
        resumed checkpoint's: torchft's step count is lockstep's), and the settings every group must
        share (JSON-able). Before the first quorum."""
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).digest()
        self._settings = torch.frombuffer(bytearray(digest), dtype=torch.int32).clone()
        self.healing.states = states
        self.manager.load_state_dict({"step": step, "batches_committed": self.manager.batches_committed()})

    def start_step(self) -> bool:
        """The next step's quorum; True when this group was behind and healed here (its train state is
        then a live peer's)."""
        self._hold_drill()
        heals = self.healing.received
        started = time.perf_counter()
        try:
            self.manager.start_quorum()
        except QUORUM_FAILURES as error:
            raise LighthouseLost(
                self.lighthouse, error, at_start=False, quorum_timeout_s=self.config.quorum_timeout_s
            ) from None
        self.participants = self.manager.num_participants()
        participant = self.manager.participating_rank()
        if participant is None:
            raise RuntimeError("torchft left this replica group out of the step it is computing")
        self.participant = participant
        replicas = list(self.process_group.replica_ids)
        healed = self.healing.received > heals
        if healed:
            self.last_heal_s = time.perf_counter() - started
            self.log.write("heal", self.manager.current_step(), seconds=self.last_heal_s, participants=replicas)
        if replicas != self._replicas:
            self.log.write("quorum", self.manager.current_step() + 1, participants=replicas)
            self._replicas = replicas
            self._check_same_settings(replicas)
        return healed

    def _hold_drill(self) -> None:
        step, _, path = os.environ.get(HOLD_ENV, "").partition(":")
        if step and int(step) == self.manager.current_step() + 1:
            while not Path(path).exists():
                time.sleep(0.05)

    def _check_same_settings(self, replicas: list[int]) -> None:
        """Every group of a new quorum must run the settings this one runs; each writes its digest into
        its own row (integers: the sum is exact) and all compare."""
        if self.participants < 2:
            return
        rows = torch.zeros(self.participants, self._settings.numel(), dtype=torch.int32)
        rows[self.participant] = self._settings
        if not self.manager.allreduce(rows, reduce_op=ReduceOp.SUM).wait():
            return  # a group failed meanwhile: this step will not commit, and the next quorum checks again
        if not all(torch.equal(row, self._settings) for row in rows):
            raise LockstepError(
                f"a replica group of the quorum {replicas} runs other settings than group {self.config.replica_id} "
                "(seed, model, optimizer, schedule, data, batch or layout): start every group with the same "
                "config, only fault_tolerance.replica_id differing"
            )

    def step_gradients(
        self,
        read_blocks: ReadBlocks,
        compute_block: ComputeBlock,
        params: list[nn.Parameter],
        counters: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[Microbatch], int] | None:
        """This group's blocks of the step, summed with the other live groups' in canonical order
        into every parameter's .grad (and `counters`, e.g. MoE token counts, summed alike); returns the
        step's loss, the first block's microbatches and the step's valid tokens, or None when fewer
        groups than fault_tolerance.min_replica_size are live (the step cannot commit)."""
        groups = self.config.group_size
        num_blocks = groups if self.config.keep_global_batch else self.participants
        if self.participants > groups:
            raise RuntimeError(
                f"{self.participants} replica groups joined the quorum, fault_tolerance.group_size is {groups}"
            )
        if self.participants < self.config.min_replica_size:  # the vote will refuse it: compute nothing
            time.sleep(1.0)  # and do not spin on the lighthouse
            return None
        blocks = tuple(blocks_of(self.participant, self.participants, num_blocks))
        self.step_samples = num_blocks * self.block_samples
        step_samples = None  # the global batch: group_size blocks
        if not self.config.keep_global_batch:  # torchft's own way: the step is the live groups' blocks
            step_samples = self.step_samples
        per_block, global_tokens = read_blocks(blocks, num_blocks, step_samples)
        packing = GradientPacking(params, counters)
        sums = {}
        for block, microbatches in zip(blocks, per_block, strict=True):
            loss = compute_block(microbatches, global_tokens)
            sums[block] = packing.take(loss)
        if self.layout_invariant_reductions:
            total = combine_blocks(sums, num_blocks, self.block_level, self._sum_across_groups)
        else:  # the usual way: this group's blocks in order, then all_reduce(SUM)
            total = sums[blocks[0]]
            for block in blocks[1:]:
                total += sums[block]
            self._sum_across_groups(total)
        return packing.put(total), per_block[0], global_tokens

    def _sum_across_groups(self, tensor: torch.Tensor) -> None:
        self._sums += 1
        if self._sums == self._kill_in_sum:
            os.kill(os.getpid(), signal.SIGKILL)  # a fault drill: die while the other groups wait in the sum
        self.manager.allreduce(tensor, reduce_op=ReduceOp.SUM).wait()  # an error makes the step uncommitted

    def committed_gradients(
        self,
        step: int,
        loader,
        read_blocks: ReadBlocks,
        compute_block: ComputeBlock,
        params: list[nn.Parameter],
        counters: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[Microbatch], int] | None:
        """``step_gradients`` and the commit vote together. A step that is not committed leaves nothing
        behind to be counted twice: the loader goes back to the step's start, the gradients and the
        counters are cleared, and None is returned (the next quorum redoes the step)."""
        position = loader.position()
        computed = self.step_gradients(read_blocks, compute_block, params, counters)
        if computed is not None and self.commit(step):
            return computed
        loader.rewind(position)
        for tensor in counters:
            tensor.zero_()
        for p in params:
            p.grad = None
        return None

    def commit(self, step: int) -> bool:
        """torchft's commit vote for the step: False when its cross-group sum failed or the quorum broke
        (recorded; the caller redoes the step with the next quorum)."""
        committed = self.manager.should_commit()
        if not committed:
            error = self.manager.errored()
            self.log.write(
                "uncommitted", step, participants=self._replicas, error=str(error.original_exception if error else "")
            )
        return committed

    def record(self) -> dict:
        """What the step's metrics record adds: the groups that computed it."""
        return {"ft/participants": self.participants}

    def close(self) -> None:
        self.manager.shutdown(wait=False)


class GradientPacking:
    """One flat fp32 vector per block: every parameter's gradient (this rank's shard), the block's
    loss, which gradients exist, and the counters. A parameter that no block gave a gradient keeps
    none, as in a run without replica groups (the optimizer skips it)."""

    def __init__(self, params: list[nn.Parameter], counters: list[torch.Tensor]) -> None:
        self.params = params
        self.counters = counters
        self.sizes = [local_tensor(p).numel() for p in params]

    def take(self, loss: torch.Tensor) -> torch.Tensor:
        """The block's gradients, loss and counters, flattened; then the gradients and counters are
        cleared for the next block."""
        device = loss.device
        pieces = [
            local_tensor(p.grad).reshape(-1).float() if p.grad is not None else torch.zeros(n, device=device)
            for p, n in zip(self.params, self.sizes, strict=True)
        ]
        present = torch.tensor([float(p.grad is not None) for p in self.params], device=device)
        pieces += [loss.reshape(1).float(), present] + [c.reshape(-1).float() for c in self.counters]
        flat = torch.cat(pieces)
        for p in self.params:
            p.grad = None
        for c in self.counters:
            c.zero_()
        return flat

    def put(self, total: torch.Tensor) -> torch.Tensor:
        """Write the summed vector back into the gradients and counters; returns the loss."""
        offset = 0
        values = []
        for n in self.sizes:
            values.append(total[offset : offset + n])
            offset += n
        loss = total[offset].reshape(())
        present = total[offset + 1 : offset + 1 + len(self.params)].tolist()
        offset += 1 + len(self.params)
        for p, value, has_grad in zip(self.params, values, present, strict=True):
            if has_grad:
                p.grad = torch.zeros_like(p)
                grad = local_tensor(p.grad)
                grad.copy_(value.view_as(grad))
        for c in self.counters:
            c.copy_(total[offset : offset + c.numel()].view_as(c))
            offset += c.numel()
        return loss


def _hostname() -> str:
    return socket.gethostname()
