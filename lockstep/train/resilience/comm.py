"""Collective timeouts that end a hung run in bounded time, and say where it hung.

Built from the ``comm`` section. As torchtitan does, every process group starts with the long
``init_timeout_seconds`` (start-up, compilation and checkpoint loading happen before and inside the
first step), and after the first step every group this rank belongs to gets the shorter
``train_timeout_seconds``. A rank that hangs then makes its peers' next collective fail within that
time, and they take the whole job down (torchrun stops the remaining workers once one exits).

Which collective? PyTorch's flight recorder (``TORCH_FR_BUFFER_SIZE`` entries per process group,
gloo and NCCL alike) keeps the last collectives each group issued. On a timeout this rank dumps it as
JSON to ``<run>/comm_traces/`` and raises ``CollectiveTimeout``, whose one line names the collective,
its process group and sizes, and the training step. On CUDA, NCCL's watchdog aborts a timed-out
communicator itself; ``TORCH_NCCL_DUMP_ON_TIMEOUT`` makes it write the same record first.

A peer that dies (kill -9, a crash) breaks its connections instead: the survivors' collective fails
at once, and ``PeerLost`` says so in one line with the same record, while the launcher names the rank
that failed first.

Drills: ``LOCKSTEP_STALL=RANK:STEP`` makes that rank hang at the start of that step (until a signal
kills it, as torchrun's teardown does), so a test or an operator can watch the others time out;
``LOCKSTEP_DIE=RANK:STEP`` makes it SIGKILL itself there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch._C._distributed_c10d import _dump_fr_trace_json

from lockstep.config.sections import CommConfig

TRACES_FOLDER = "comm_traces"
_SET_HERE: set[str] = set()
"""The environment variables this module set (the others are the user's, and win)."""


class CollectiveFailure(RuntimeError):
    """A collective that could not complete because of a peer or the network, not of this rank: a failure
    of the job's machines, not a bad input, so the CLI prints this one line and exits 1."""


class CollectiveTimeout(CollectiveFailure):
    """A collective did not complete within the comm timeout (a peer hung or died)."""


class PeerLost(CollectiveFailure):
    """A peer's connection broke inside a collective (it was killed or crashed): the launcher names the
    rank that failed first, so the survivors say so in one line each instead of a traceback."""


def is_timeout(error: BaseException) -> bool:
    """gloo raises "Timed out waiting Nms for ..."; NCCL (blocking wait) "... timed out"."""
    return isinstance(error, RuntimeError) and "timed out" in str(error).lower()


_PEER_GONE = ("connection reset by peer", "connection closed by peer", "socket closed", "broken pipe")


def is_peer_lost(error: BaseException) -> bool:
    """gloo's transport errors when the other end of a pair died; NCCL reports them as DistBackendError."""
    if isinstance(error, dist.DistBackendError):
        return True
    return isinstance(error, RuntimeError) and any(phrase in str(error).lower() for phrase in _PEER_GONE)


def _process_groups() -> list[dist.ProcessGroup]:
    """Every process group this rank belongs to (the default one, the mesh's, the validator's...)."""
    return list(dist.distributed_c10d._world.pg_map)


class CommTimeouts:
    def __init__(self, comm: CommConfig, run_folder: Path, rank: int) -> None:
        self.comm = comm
        self.run_folder = run_folder
        self.rank = rank
        self.timeout_s = comm.init_timeout_seconds
        """The timeout every process group has now."""

    @property
    def init_timeout(self) -> timedelta:
        return timedelta(seconds=self.comm.init_timeout_seconds)

    def configure_environment(self, nccl: bool) -> None:
        """Before the first process group exists: the flight recorder's size, and NCCL's dump on a
        timeout (a value the user exported wins; NCCL's watchdog writes into a folder that must exist)."""
        if self.comm.trace_buf_size == 0:
            return
        if nccl:
            (self.run_folder / TRACES_FOLDER).mkdir(parents=True, exist_ok=True)
        values = {
            "TORCH_FR_BUFFER_SIZE": str(self.comm.trace_buf_size),
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": str(self.run_folder / TRACES_FOLDER / "nccl_rank_"),
        }
        for key, value in values.items():
            if key not in os.environ or key in _SET_HERE:  # a later run in this process updates its own
                os.environ[key] = value
                _SET_HERE.add(key)

    def step_done(self, step: int) -> None:
        """After the first step of this launch: every group switches to the training timeout."""
        if self.timeout_s != self.comm.train_timeout_seconds:
            self._set_timeout(self.comm.train_timeout_seconds)

    @contextlib.contextmanager
    def relaxed(self) -> Iterator[None]:
        """The init timeout for what may legitimately keep ranks apart for long (a checkpoint save whose
        ranks write at different speeds, an evaluation over the whole split), then back."""
        previous = self.timeout_s
        if previous == self.comm.init_timeout_seconds:
            yield
            return
        self._set_timeout(self.comm.init_timeout_seconds)
        try:
            yield
        finally:
            self._set_timeout(previous)

    def _set_timeout(self, seconds: int) -> None:
        if not dist.is_initialized():
            return
        for group in _process_groups():
            with contextlib.suppress(ValueError):  # a group this rank is not part of
                dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), group)
        self.timeout_s = seconds

    @contextlib.contextmanager
    def watching(self, step: int) -> Iterator[None]:
        """Turns a collective timeout raised inside into a CollectiveTimeout naming `step`."""
        self._stall_drill(step)
        try:
            yield
        except Exception as error:
            if is_timeout(error):
                raise CollectiveTimeout(self._describe(step)) from error
            if is_peer_lost(error):
                raise PeerLost(self._describe(step, lost=str(error))) from error
            raise

    def _stall_drill(self, step: int) -> None:
        if os.environ.get("LOCKSTEP_DIE") == f"{self.rank}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)  # a rank that dies at once, as under kill -9
        if os.environ.get("LOCKSTEP_STALL") != f"{self.rank}:{step}":
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # hung for good: only a signal ends it
        while True:
            time.sleep(60)

    def _describe(self, step: int, lost: str = "") -> str:
        what, dump = "a collective", self._dump(step)
        if dump is not None:
            what = _last_collective(json.loads(dump.read_text()))
        where = f"; flight recorder: {dump}" if dump is not None else " (comm.trace_buf_size = 0: no flight recorder)"
        if lost:
            cause = lost.split("] ", 1)[-1].split(". ")[0][:120]
            return f"rank {self.rank}: {what} failed at step {step}: a peer is gone ({cause}){where}"
        return (
            f"rank {self.rank}: {what} timed out after {self.timeout_s} s at step {step} "
            f"(a peer hung or died; comm.{'train' if self.timeout_s == self.comm.train_timeout_seconds else 'init'}"
            f"_timeout_seconds){where}"
        )

    def _dump(self, step: int) -> Path | None:
        """This rank's flight-recorder record as JSON (never a pickle), a new file each time."""
        if self.comm.trace_buf_size == 0:
            return None
        try:
            record = _dump_fr_trace_json()
        except (ImportError, RuntimeError):
            return None
        folder = self.run_folder / TRACES_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step{step}-rank{self.rank}-pid{os.getpid()}.json"
        path.write_bytes(record)
        return path


def _last_collective(record: dict) -> str:
    """The newest collective of the flight record: the one this rank was waiting in."""
    entries = record.get("entries") or []
    if not entries:
        return "a collective"
    last = max(entries, key=lambda e: e.get("record_id", 0))
    group = last.get("process_group") or ["?", "?"]
    sizes = ", ".join(
        f"{dtype}{list(size)}"
        for dtype, size in zip(last.get("input_dtypes", []), last.get("input_sizes", []), strict=False)
    )
    return (
        f"collective {last.get('profiling_name', '?')} on process group {group[-1]} "
        f"(collective #{last.get('collective_seq_id', '?')}, {sizes or 'no tensors'})"
    )
