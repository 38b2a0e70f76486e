"""The estimate as a person reads it: the layout, per-stage memory by term against the device, the
traffic per step by link class next to what NCCL's rings would move, the step time it allows, the
verdict and the advice."""

from __future__ import annotations

from lockstep.tools.estimate.estimate import Estimate

MEMORY_NAMES = {
    "parameters": "parameters (fp32 shards)",
    "buffers": "buffers",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "unsharded_parameters": "unsharded + prefetched parameters",
    "reduction_buffers": "gradient reduction buffers",
    "attention": "attention",
    "routed_experts": "routed experts (dispatch, EP copies)",
    "logits_and_loss": "logits and loss",
    "activations": "other saved activations",
    "backward": "backward temporaries",
    "fragmentation_margin": "allocator fragmentation margin",
    "cuda_context_and_nccl": "CUDA context, NCCL (fixed)",
}


def render(result: Estimate) -> str:
    layout, verdict, compute = result.layout, result.verdict, result.compute
    lines = [
        f"lockstep estimate: {result.config['model']} on {layout['nnodes']} x {layout['nproc_per_node']} "
        f"{result.device['name']} ({result.device['memory_gib']:.1f} GiB each)",
        f"layout: pp {layout['pp']} x dp_replicate {layout['dp_replicate']} x dp_shard {layout['dp_shard']} x "
        f"tp {layout['tp']} (ep {layout['ep']}); {layout['mixed_precision']}, AC {layout['activation_checkpoint']}, "
        f"{layout['reductions']} reductions{', deterministic' if layout['deterministic'] else ''}, "
        f"{layout['attention']}; microbatch {layout['microbatch']} x {layout['microbatches_per_step']} per step, "
        f"seq {layout['seq_len']}",
        "",
    ]
    header = ["memory per rank (GiB)"] + [f"stage {s.stage} (rank {s.rank})" for s in result.stages]
    rows = [[MEMORY_NAMES[term]] + [f"{s.memory[term]:.2f}" for s in result.stages] for term in MEMORY_NAMES]
    rows = [r for r in rows if any(float(v) > 0.005 for v in r[1:])]
    rows.append(["total at peak"] + [f"{s.total_gib:.2f} ({s.peak_phase})" for s in result.stages])
    lines += _table(header, rows) + [""]
    worst = max(result.stages, key=lambda s: sum(v["inter_gb"] for v in s.traffic.values()))
    kinds = sorted(worst.traffic)
    header = [f"traffic per step, rank {worst.rank} (GB sent)", "intra-node", "inter-node", "calls", "as rings: inter"]
    rows = [
        [k, f"{worst.traffic[k]['intra_gb']:.3f}", f"{worst.traffic[k]['inter_gb']:.3f}", str(worst.traffic[k]["calls"]),
         f"{worst.ring_traffic.get(k, {}).get('inter_gb', 0.0):.3f}"]
        for k in kinds
    ]  # fmt: skip
    total = sum(v["inter_gb"] for v in worst.traffic.values())
    ring = sum(v["inter_gb"] for v in worst.ring_traffic.values())
    intra = sum(v["intra_gb"] for v in worst.traffic.values())
    rows.append(["total", f"{intra:.3f}", f"{total:.3f}", "", f"{ring:.3f}"])
    lines += _table(header, rows) + [""]
    lines.append(
        f"compute: {compute['hardware_tflop_per_rank']:.1f} TFLOP per rank per step ({compute['model_tflop_per_rank']:.1f} "
        f"model); at peak {compute['compute_s']:.3f} s, NVLink {compute['intra_node_s']:.3f} s, network "
        f"{compute['inter_node_s']:.3f} s -> step >= {compute['step_s']:.3f} s, MFU ceiling "
        f"{compute['mfu_ceiling_percent']:.1f}% ({compute['bound_by']}-bound"
        + (f", pipeline bubble {100 * compute['pipeline_bubble']:.1f}%" if compute["pipeline_bubble"] else "") + ")"
    )  # fmt: skip
    fit = "fits" if verdict["fits"] else "does NOT fit"
    lines.append(
        f"verdict: {fit}: {verdict['peak_gib']:.1f} GiB at the peak of stage {verdict['worst_stage']} against "
        f"{verdict['device_gib']:.1f} GiB; the biggest term is {MEMORY_NAMES[verdict['biggest_term']]} "
        f"({verdict['biggest_term_gib']:.1f} GiB)"
    )
    for entry in result.advice:
        mark = "fits" if entry["fits"] else "still does not fit"
        lines.append(
            f"  {entry['change']}: {entry['peak_gib']:.1f} GiB, {mark}; step >= {entry['step_s']:.3f} s, "
            f"MFU ceiling {entry['mfu_ceiling_percent']:.1f}%"
        )
    lines += [f"note: {n}" for n in result.notes] + [f"estimated in {result.seconds:.1f} s"]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
