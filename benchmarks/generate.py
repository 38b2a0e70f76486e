"""Generation speed of llama3_debug (random init, vocab 2048): tokens/s with and without the KV cache.

Greedy, no EOS (every run makes exactly --new-tokens tokens per prompt), fp32 on the CPU, one
process. Without the cache every step runs the whole sequence through the model again; with it, a
step runs only the newest token. The two make the same tokens (checked here too). Writes
``benchmarks/results/generate.json``.

    .venv/bin/python benchmarks/generate.py [--new-tokens 256] [--prompt-tokens 16 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lockstep.config.sections import ModelConfig
from lockstep.generate.loop import generate
from lockstep.generate.sampling import SamplingSettings
from lockstep.models.registry import model_args

RESULTS = Path(__file__).parent / "results"


def build(max_seq_len: int) -> torch.nn.Module:
    spec, args = model_args(ModelConfig(flavor="debug"), vocab_size=2048, max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = spec.build(args, "sdpa")
    model.init_weights(0, "cpu")
    return model.eval()


def measure(model, prompts: list[list[int]], new_tokens: int, use_cache: bool) -> tuple[dict, list[list[int]]]:
    settings = SamplingSettings(max_new_tokens=new_tokens, greedy=True)
    generate(model, prompts, SamplingSettings(max_new_tokens=4, greedy=True), None, use_cache=use_cache)  # warm-up
    started = time.perf_counter()
    tokens = generate(model, prompts, settings, eos_id=None, use_cache=use_cache)
    wall = time.perf_counter() - started
    made = sum(map(len, tokens))
    return {"kv_cache": use_cache, "batch": len(prompts), "new_tokens": made, "wall_s": wall,
            "tokens_per_sec": made / wall}, tokens  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(max(args.prompt_tokens) + args.new_tokens)
    rows = []
    for prompt_tokens in args.prompt_tokens:
        prompt = torch.randint(0, 2048, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        recompute, recomputed = measure(model, [prompt], args.new_tokens, use_cache=False)
        cached, tokens = measure(model, [prompt], args.new_tokens, use_cache=True)
        if tokens != recomputed:
            raise SystemExit("the cached and recomputed runs made different tokens")
        batched, _ = measure(model, [prompt] * 8, args.new_tokens, use_cache=True)
        speedup = cached["tokens_per_sec"] / recompute["tokens_per_sec"]
        rows += [{"prompt_tokens": prompt_tokens, **row} for row in (recompute, cached, batched)]
        print(
            f"prompt {prompt_tokens:>4} + {args.new_tokens} new: without cache {recompute['tokens_per_sec']:6.1f} tok/s, "
            f"with {cached['tokens_per_sec']:6.1f} tok/s ({speedup:.1f}x, same tokens); "
            f"batch 8 with cache {batched['tokens_per_sec']:7.1f} tok/s",
            flush=True,
        )
    result = {"model": "llama3_debug", "threads": args.threads, "new_tokens": args.new_tokens, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generate.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
