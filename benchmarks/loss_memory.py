"""Peak memory of the loss's forward and backward, full logits against training.loss_chunk_tokens: one
[1, 4096] sample, vocab 32000, model dim 512, fp32 on the CPU.

Each case runs in a fresh subprocess that builds its inputs, records its peak RSS (ru_maxrss), runs
loss + backward and reports the growth of the peak: torch's CPU allocations are invisible to
tracemalloc, and a fresh process keeps one case's freed pages from hiding the next one's. glibc's
mmap threshold is pinned at 1 MiB so that every large tensor is mapped and unmapped on its own (by
default the threshold grows to 32 MiB after the first free, and freed heap blocks of that size then
stay in the RSS, counting memory that is no longer live).

    .venv/bin/python benchmarks/loss_memory.py [--chunk-tokens 0 1024 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from torch import nn

from lockstep.train.loss import chunked_global_batch_loss, global_batch_loss

SEQ, VOCAB, DIM = 4096, 32000, 512


def measure(chunk_tokens: int) -> dict[str, float]:
    """Peak RSS growth (MiB) of one loss forward + backward in this process."""
    torch.manual_seed(0)
    output = nn.Linear(DIM, VOCAB, bias=False)
    h_BSD = torch.randn(1, SEQ, DIM, requires_grad=True)
    labels_BS = torch.randint(0, VOCAB, (1, SEQ))
    output.weight.grad = torch.zeros_like(output.weight)  # both cases hold the gradient: not counted
    h_BSD.grad = torch.zeros_like(h_BSD)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if chunk_tokens:
        loss = chunked_global_batch_loss(h_BSD, output, labels_BS, SEQ, chunk_tokens)
    else:
        loss = global_batch_loss(output(h_BSD), labels_BS, SEQ)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"chunk_tokens": chunk_tokens, "peak_growth_mib": (peak - before) / 1024, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk-tokens", type=int, nargs="+", default=[0, 1024, 256])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the subprocess of one case
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one)))
        return
    logits_mib = SEQ * VOCAB * 4 / 2**20
    print(f"[1, {SEQ}] x vocab {VOCAB}, dim {DIM}: fp32 logits are {logits_mib:.0f} MiB")
    for chunk_tokens in args.chunk_tokens:
        command = [sys.executable, __file__, "--one", str(chunk_tokens)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        print(json.loads(result.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
