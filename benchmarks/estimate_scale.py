"""The scale table (issue 23): what lockstep estimate predicts per rank on H100s for the big presets, with
the defaults and with debug.deterministic: peak GiB by term (worst pipeline stage), the inter-node bytes
per step next to what NCCL's rings would move for the same reductions, the step time and MFU ceiling
those allow, and how long the estimate took. Writes benchmarks/results/estimate_scale.json.

    .venv/bin/python benchmarks/estimate_scale.py [--only llama3_70b@512 ...] [--device h100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lockstep.config import load_config
from lockstep.tools.estimate import Topology, device_spec, estimate

CONFIGS = {
    "llama3_8b@8": ("llama3_8b", 1, []),
    "llama3_8b@64": ("llama3_8b", 8, []),
    "llama3_70b@64": ("llama3_70b", 8, []),
    "llama3_70b@512": ("llama3_70b", 64, []),
    "llama3_405b@512": ("llama3_405b", 64, []),
    "deepseek_v3_671b@256": ("deepseek_v3_671b", 32, []),
    "deepseek_v3_671b@512": ("deepseek_v3_671b", 64, ["--parallelism.data_parallel_replicate_degree", "2"]),
    "qwen3_moe_235b@128": ("qwen3_moe_235b", 16, []),
}
TERMS = {
    "parameters": "params", "gradients": "grads", "optimizer": "AdamW", "unsharded_parameters": "unsharded",
    "reduction_buffers": "grad reduction", "attention": "attention", "routed_experts": "experts",
    "logits_and_loss": "logits+loss", "activations": "other act.", "backward": "backward tmp",
}  # fmt: skip
RESULTS = Path(__file__).parent / "results" / "estimate_scale.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--device", default="h100", choices=["h100", "h200"])
    args = parser.parse_args()
    device = device_spec(args.device)
    rows = []
    for key in args.only:
        name, nodes, extra = CONFIGS[key]
        for mode, flags in (("default", []), ("deterministic", ["--debug.deterministic"])):
            result = estimate(load_config(name, extra + flags), Topology(nodes, 8), device)
            worst = max(result.stages, key=lambda s: s.total_gib)
            busiest = max(result.stages, key=lambda s: sum(v["inter_gb"] for v in s.traffic.values()))
            rows.append({
                "config": key, "mode": mode, "layout": result.layout, "peak_gib": worst.total_gib,
                "stage": worst.stage, "terms": worst.memory, "fits": result.verdict["fits"],
                "inter_gb": sum(v["inter_gb"] for v in busiest.traffic.values()),
                "ring_inter_gb": sum(v["inter_gb"] for v in busiest.ring_traffic.values()),
                "intra_gb": sum(v["intra_gb"] for v in busiest.traffic.values()),
                "traffic": busiest.traffic, "compute": result.compute, "seconds": result.seconds,
                "notes": result.notes,
            })  # fmt: skip
            print(f"{key} {mode}: {worst.total_gib:.1f} GiB, inter {rows[-1]['inter_gb']:.1f} GB "
                  f"(rings {rows[-1]['ring_inter_gb']:.1f}), {result.seconds:.1f} s", flush=True)  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| config | mode | layout | peak GiB/rank | " + " | ".join(TERMS.values()) + " | fits |",
             "|---" * (5 + len(TERMS)) + "|"]  # fmt: skip
    for r in rows:
        lay = r["layout"]
        layout = f"dp {lay['dp_replicate']}x{lay['dp_shard']}, tp {lay['tp']}, pp {lay['pp']}, ep {lay['ep']}, AC {lay['activation_checkpoint']}"
        terms = " | ".join(f"{r['terms'].get(t, 0):.1f}" for t in TERMS)
        lines.append(
            f"| {r['config']} | {r['mode']} | {layout} | {r['peak_gib']:.1f} | {terms} | {'yes' if r['fits'] else '**no**'} |"
        )
    lines += ["", "| config | mode | inter-node GB/step/rank | as NCCL rings | intra-node GB | step >= s | bound by | MFU ceiling | estimate s |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        c = r["compute"]
        lines.append(f"| {r['config']} | {r['mode']} | {r['inter_gb']:.1f} | {r['ring_inter_gb']:.1f} | {r['intra_gb']:.1f} | "
                     f"{c['step_s']:.2f} | {c['bound_by']} | {c['mfu_ceiling_percent']:.1f}% | {r['seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
