"""Fingerprints: one hash of a whole model's tensors that any layout reproduces, without gathering them.

A tensor's digest is a keyed sum over its elements, computed where the elements are:

    digest[lane] = sum over elements e of bits(e) * key(lane, global index of e)   (mod 2^64)

where bits(e) is the element's raw bit pattern and the key is a product of one odd pseudo-random
64-bit number per (lane, dim, index along that dim). Integer sums mod 2^64 are exact in any order, so
each rank sums its own shard (a box of the global tensor; DTensors are never gathered) and the shards'
partial digests add up to the same value whatever the layout: rows split over FSDP ranks, columns split
over tensor-parallel ranks (row-parallel weights) or both. The ranks add their parts with
``sum_over_shards`` (one small all-reduce per sharded mesh axis), pipeline stages pool theirs, and the
per-tensor digests are hashed in the model's fixed name order. Changing one element always changes the
digest (its key is odd, so invertible mod 2^64); two lanes give 128 bits against accidental collisions.
It is a checksum to find the first step where two runs' numbers part, not a cryptographic hash.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lockstep.parallel.canonical import shard_box, sum_over_shards
from lockstep.run.jsonl import JsonlWriter
from lockstep.untrusted import parse_json

LANES = 2
CHUNK_ELEMENTS = 1 << 22
"""Elements hashed at once: bounds the int64 temporaries (a few times 32 MiB) for large tensors."""
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MIX = (-4658895280553007687, -7723592293110705685)  # splitmix64's multipliers as signed int64


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps mod 2^64)."""
    x = (x ^ _shift_right(x, 30)) * _MIX[0]
    x = (x ^ _shift_right(x, 27)) * _MIX[1]
    return x ^ _shift_right(x, 31)


def _keys(lane: int, dim: int, start: int, length: int, device: torch.device) -> torch.Tensor:
    """Odd keys for global indices [start, start + length) along `dim`."""
    salt = (lane * 1_000_003 + dim + 1) << 40
    return _mix(torch.arange(start, start + length, dtype=torch.int64, device=device) + salt) | 1


def _hex(words: list[int]) -> str:
    return "".join(f"{w & ((1 << 64) - 1):016x}" for w in words)


def local_digest(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of `tensor`'s digest: int64 [LANES], the keyed sum over the elements it holds."""
    local = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach()
    offset, shape = shard_box(tensor)
    if local.ndim == 0:
        local, offset, shape = local.reshape(1), (0,), (1,)
    digest = torch.zeros(LANES, dtype=torch.int64, device=local.device)
    if local.numel() == 0:
        return digest
    bits = local.contiguous().view(_BITS[local.element_size()])
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, local[0].numel()))
    for first in range(0, shape[0], rows_per_chunk):
        chunk = bits[first : first + rows_per_chunk].to(torch.int64)
        starts = (offset[0] + first, *offset[1:])
        for lane in range(LANES):
            keyed = chunk
            for dim, (start, length) in enumerate(zip(starts, chunk.shape, strict=True)):
                view = [1] * chunk.ndim
                view[dim] = length
                keyed = keyed * _keys(lane, dim, start, length, local.device).view(view)
            digest[lane] += keyed.sum()
    return digest


def model_fingerprint(
    named: dict[str, torch.Tensor],
    all_names: list[str],
    stage_group: dist.ProcessGroup | None = None,
    local: dict[str, str] | None = None,
) -> str:
    """Hash of the tensors in `named` (this rank's stages), pooled over pipeline stages, in the order
    of `all_names`. Every rank of the stage group gets the same value, in every layout. `local`, when
    given, receives this rank's own part of each tensor's digest (the elements it holds): what
    ``lockstep replay`` compares to name the rank whose numbers changed."""
    names = [name for name in all_names if name in named]
    device = next(iter(named.values())).device if named else torch.device("cpu")
    # one row per name: LANES digest words and a presence count (how many shards added to the row)
    rows = torch.zeros(len(all_names), LANES + 1, dtype=torch.int64, device=device)
    slot = {name: i for i, name in enumerate(all_names)}
    sharded = [n for n in names if isinstance(named[n], DTensor)]
    own = [torch.cat([local_digest(named[n]), torch.ones(1, dtype=torch.int64, device=device)]) for n in sharded]
    if local is not None:
        mine = dict(zip(sharded, own, strict=True)) | {n: local_digest(named[n]) for n in names if n not in sharded}
        local.update({n: _hex(mine[n][:LANES].tolist()) for n in names})
    for name, row in zip(sharded, sum_over_shards([named[n] for n in sharded], own), strict=True):
        rows[slot[name]] = row
    for name in names:
        if name not in sharded:
            rows[slot[name], :LANES] = local_digest(named[name])
            rows[slot[name], LANES] = 1
    if stage_group is not None and dist.get_world_size(stage_group) > 1:
        dist.all_reduce(rows, group=stage_group)  # integers: exact, and each row comes from one stage
    combined = hashlib.blake2b(digest_size=16)
    for name, row in zip(all_names, rows.tolist(), strict=True):
        if row[LANES]:
            combined.update(f"{name}:{_hex(row[:LANES])}\n".encode())
    return combined.hexdigest()


class ModuleOutputs:
    """This rank's digest of every module's first output in one step (its first microbatch, in execution
    order), from forward hooks attached for that step only. A silent fault in one rank's forward shows
    here as that rank's first differing module, while the gradients, summed over ranks, differ everywhere."""

    def __init__(self, parts: list[torch.nn.Module]) -> None:
        self.digests: dict[str, str] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name))
            for part in parts
            for name, module in part.named_modules()
            if name
        ]

    def _hook(self, name: str):
        def hook(module, args, output) -> None:
            if name in self.digests:
                return
            if isinstance(output, tuple | list):
                output = next((o for o in output if isinstance(o, torch.Tensor)), None)
            if isinstance(output, torch.Tensor) and output.numel():
                try:
                    self.digests[name] = _hex(local_digest(output.detach()).tolist())
                except (RuntimeError, ValueError, NotImplementedError):  # an output without a box (e.g. Partial)
                    pass

        return hook

    def close(self) -> dict[str, str]:
        for handle in self._handles:
            handle.remove()
        return self.digests


class RankFingerprints:
    """Each rank's own part of the fingerprints, per tensor, at every fingerprinted step:
    ``<run>/fingerprints/rank<R>.jsonl``. A replay of the step on any machine recomputes them, and the
    first rank and tensor that differ say where the numbers changed (lockstep.tools.reproduce)."""

    FOLDER = "fingerprints"

    def __init__(self, run_folder, rank: int) -> None:
        self.path = run_folder / self.FOLDER / f"rank{rank}.jsonl"
        self.file = JsonlWriter(self.path, make_folder=True)

    def write(self, step: int, local: dict[str, dict[str, str]]) -> None:
        self.file.append({"step": step, **local})

    @classmethod
    def read(cls, run_folder, rank: int, step: int) -> dict[str, dict[str, str]] | None:
        """The newest record of `step` (a resumed run may have fingerprinted it twice; the later launch
        is the one its metrics show)."""
        path = run_folder / cls.FOLDER / f"rank{rank}.jsonl"
        if not path.is_file():
            return None
        found = None
        for line in path.read_text().splitlines():
            try:
                record = parse_json(line, allow_nan=True)
            except ValueError:  # a line cut short by a crash
                continue
            if isinstance(record, dict) and record.get("step") == step:
                found = record
        return found
