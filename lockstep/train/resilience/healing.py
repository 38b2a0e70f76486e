"""A replica group's live state, sent to a restarted group through torchft's checkpoint transport.

The sender's side is every checkpoint part (model, optimizer, scheduler, loader position, train state,
RNG; MoE router biases are model buffers) with each DTensor replaced by this rank's shard: replica
groups run one layout, and the transport connects rank r of every group, so shards line up. It is a
snapshot on the CPU, taken after the device has finished the last step's updates: torchft serves it
from a thread while this group goes on training, and a transfer must not see a half-updated tensor. The
receiver asks its own parts for their state dicts (torch.distributed.checkpoint's way of loading:
the optimizer's moments are created if it never stepped), fills them from what arrived, in place for
its shards, and loads them.

Nothing received may execute code. torchft's HTTP transport unpickles with ``weights_only=False``;
``SafeHTTPTransport`` reads the same stream with torch's weights-only unpickler, which builds tensors
and plain containers only, so the state must stay plain (it does: see lockstep.checkpoint.states),
and it fetches over http(s) only.
"""

from __future__ import annotations

import urllib.request
import warnings
from datetime import timedelta
from typing import IO, Any
from urllib.parse import urlparse

import torch
from torch.distributed.tensor import DTensor
from torchft.checkpointing._serialization import _streaming_load
from torchft.checkpointing.http_transport import HTTPTransport

from lockstep.errors import LockstepError


class SafeHTTPTransport(HTTPTransport):
    """torchft's HTTP checkpoint transport, reading what a peer sends with the weights-only unpickler.

    torchft's commit vote closes the served checkpoint (``disallow_checkpoint``) and gives up after
    the transport's timeout if a transfer is still being read, raising out of ``should_commit`` after
    the vote. Here it waits for the transfer instead: the receiver's own HTTP timeout bounds it."""

    def __init__(self, timeout: timedelta, num_chunks: int) -> None:
        super().__init__(timeout=timeout, num_chunks=num_chunks)
        self._checkpoint_lock.timeout = -1  # block until the transfer in flight ends

    @classmethod
    def _load_from_address(cls, address: str, timeout: timedelta) -> object:
        if urlparse(address).scheme not in ("http", "https"):
            raise LockstepError(f"healing: a peer announced {address!r}; only http(s) checkpoint addresses are read")
        with urllib.request.urlopen(address, timeout=timeout.total_seconds()) as f:
            return read_peer_state(f)


def read_peer_state(stream: IO[bytes]) -> object:
    """A peer's state from torchft's stream format, through torch's weights-only unpickler."""
    with warnings.catch_warnings():  # tensors are built over the received bytes, which we own
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return _streaming_load(stream, weights_only=True)


def plain(value: Any) -> Any:
    """`value` as a CPU snapshot, every DTensor replaced by this rank's shard and tuples by lists: what
    the weights-only unpickler accepts, and what a peer with the same layout can load in place."""
    if isinstance(value, DTensor):
        value = value.to_local()
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def fill(template: Any, received: Any, where: str) -> Any:
    """`template` (this rank's own state dict) with the values of `received` (a peer's ``plain``):
    shards are copied into the template's DTensors, other tensors moved to its device, the rest taken."""
    if isinstance(template, DTensor):
        local = template.to_local()
        if not isinstance(received, torch.Tensor) or received.shape != local.shape:
            got = tuple(received.shape) if isinstance(received, torch.Tensor) else type(received).__name__
            raise LockstepError(
                f"healing: {where} arrived as {got}, this rank holds a shard of {tuple(local.shape)}; every "
                "replica group must run the same layout (parallelism section and --nproc)"
            )
        local.copy_(received)
        return template
    if isinstance(template, torch.Tensor) and isinstance(received, torch.Tensor):
        return received.to(template.device)
    if isinstance(template, dict) and isinstance(received, dict):
        return {k: fill(template[k], v, f"{where}.{k}") if k in template else v for k, v in received.items()}
    if isinstance(template, tuple) and isinstance(received, list):
        return tuple(fill(t, r, where) for t, r in zip(template, received, strict=True))
    return received


class HealingState:
    """The state_dict / load_state_dict pair torchft's Manager sends and receives, over the same parts
    a checkpoint holds (``states``: name -> object with state_dict()/load_state_dict())."""

    def __init__(self, states: dict) -> None:
        self.states = states
        self.received = 0
        """How many times a peer's state was loaded here (a heal)."""

    def state_dict(self) -> dict:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the last step's optimizer and bias updates, queued on any stream
        return {name: plain(part.state_dict()) for name, part in self.states.items()}

    def load_state_dict(self, received: dict) -> None:
        missing = sorted(set(self.states) - set(received))
        if missing:
            raise LockstepError(f"healing: the peer's state lacks {', '.join(missing)}")
        for name, part in self.states.items():
            part.load_state_dict(fill(part.state_dict(), received[name], name))
        self.received += 1
