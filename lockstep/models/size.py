"""How big a model is before it is built, and whether it can fit: so that an ``n_layers``, ``dim`` or
vocabulary typed a few orders of magnitude too large (by hand, in an HF config.json or in a crafted
checkpoint manifest) is one line naming the sizes, never an allocation error or a build without end."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

TRAINING_BYTES_PER_PARAMETER = 16
"""fp32 weights, gradients and AdamW's two moments: a floor under what training holds per parameter."""

WEIGHT_BYTES_PER_PARAMETER = 4
"""fp32 weights alone: what converting, evaluating or generating holds at least."""


def machine_memory_bytes() -> int:
    """The most memory one rank of this machine could use: its host memory or its largest GPU's."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    gpus = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    return max([host, *gpus])


def _built_counts(spec: Any, args: Any, layers: int) -> dict[str, int]:
    """Parameters and buffer elements of a meta build of the model with `layers` layers."""
    with torch.device("meta"):
        model = spec.build(dataclasses.replace(args, n_layers=layers), "sdpa")
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "buffers": sum(b.numel() for b in model.buffers()),
    }


def _over_all_blocks(measure, spec: Any, args: Any, fixed: tuple[str, ...] = ()) -> dict[str, float]:
    """`measure(spec, args, layers)` (a dict of counts of a meta build) for the whole model, from builds
    of at most a few blocks (so an absurd n_layers is counted, not built): past the dense prefix the
    blocks repeat with the args' ``block_period`` (1 unless a model interleaves kinds of blocks, as
    Llama 4 does), so what each block of a period adds is measured once and repeated. The `fixed`
    counts are the smallest build's, not extrapolated."""
    dense = getattr(args, "n_dense_layers", 0)
    period = getattr(args, "block_period", 1)
    first = dense + period
    if args.n_layers <= first + period:
        return measure(spec, args, args.n_layers)
    builds = [measure(spec, args, first + j) for j in range(period + 1)]
    adds = [{k: builds[j + 1][k] - builds[j][k] for k in builds[0]} for j in range(period)]
    base = builds[0]
    full, extra = divmod(args.n_layers - first, period)  # blocks first.. cycle through the period from its start
    repeats = [full + (j < extra) for j in range(period)]
    return {
        k: base[k] if k in fixed else base[k] + sum(r * add[k] for r, add in zip(repeats, adds, strict=True))
        for k in base
    }


def element_counts(spec: Any, args: Any) -> tuple[int, int]:
    """(parameters, buffer elements) of the model (``_over_all_blocks``); buffers (the RoPE table grows
    with max_seq_len) from the smaller build."""
    counts = _over_all_blocks(_built_counts, spec, args, fixed=("buffers",))
    return counts["parameters"], counts["buffers"]


def _parameter_kinds(spec: Any, args: Any, layers: int) -> dict[str, float]:
    """Parameters of a meta build with `layers` layers: all, the embedding and output rows, and the
    routed experts counted at the fraction of them a token uses (top_k of num_experts)."""
    with torch.device("meta"):
        model = spec.build(dataclasses.replace(args, n_layers=layers), "sdpa")
    unique = {id(p): p for p in model.parameters()}  # a tied output is the embedding
    embedding = {
        id(p) for name in ("tok_embeddings", "output") for p in getattr(model, name, torch.nn.Module()).parameters()
    }
    routed = active = 0.0
    for module in model.modules():
        experts, router = getattr(module, "experts", None), getattr(module, "router", None)
        if experts is not None and router is not None:
            count = sum(p.numel() for p in experts.parameters())
            routed += count
            active += count * router.top_k / router.num_experts
    total = sum(p.numel() for p in unique.values())
    return {
        "total": total,
        "embedding": sum(unique[i].numel() for i in embedding if i in unique),
        "inactive_experts": routed - active,
    }


def parameter_counts(spec: Any, args: Any) -> dict[str, int]:
    """The model's parameters: ``total``, ``non_embedding`` (without the embedding and output rows) and
    ``active`` (what one token uses: for a mixture of experts, top_k of the routed experts), counted
    over all blocks as ``element_counts`` counts them (``_over_all_blocks``). Printed at start, in env.json."""
    kinds = _over_all_blocks(_parameter_kinds, spec, args)
    return {
        "total": int(kinds["total"]),
        "non_embedding": int(kinds["total"] - kinds["embedding"]),
        "active": int(round(kinds["total"] - kinds["inactive_experts"])),
    }


def describe_parameters(counts: dict[str, int]) -> str:
    """``parameter_counts`` in one line: the active count only where it differs (a mixture of experts)."""
    line = f"{counts['total']:,} parameters, {counts['non_embedding']:,} without embeddings"
    if counts["active"] != counts["total"]:
        line += f", {counts['active']:,} active per token"
    return line


def size_problem(
    spec: Any, args: Any, *, bytes_per_parameter: int, world_size: int = 1, memory_bytes: float | None = None
) -> str | None:
    """Why the model cannot fit `memory_bytes` per rank (this machine's by default) at `bytes_per_parameter`
    spread over `world_size` ranks, or None: the sizes, the need and the limit, in one line."""
    try:
        parameters = sum(element_counts(spec, args))
    except (OverflowError, RuntimeError, ValueError, TypeError, MemoryError) as error:
        cause = str(error).strip().splitlines()[0][:120] if str(error).strip() else "a size beyond any tensor"
        return f"cannot be sized ({type(error).__name__}: {cause})"
    need, have = parameters * bytes_per_parameter / world_size, memory_bytes or machine_memory_bytes()
    if need <= have:
        return None
    shape = ", ".join(
        f"{k} {getattr(args, k)}" for k in ("n_layers", "dim", "vocab_size", "max_seq_len") if hasattr(args, k)
    )
    return (
        f"{shape}: {parameters:.3g} parameters need at least {need / 2**30:.1f} GiB per rank at {bytes_per_parameter} "
        f"bytes each (buffers counted too) over {world_size} rank(s); a rank has at most {have / 2**30:.1f} GiB"
    )
