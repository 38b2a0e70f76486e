"""Regenerate the reference losses when a numerics change is intended (and say why in the commit):

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.assets.losses.regenerate

20 steps of llama3_debug (seq 128, batch 4, seed 0, deterministic, one thread) on the CPU; the
test in tests/tools/test_reference_losses.py asserts a rerun equals this file bitwise.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REFERENCE = Path(__file__).parent / "llama3_debug_cpu.jsonl"
OVERRIDES = [
    "--training.steps", "20", "--training.seq_len", "128", "--training.local_batch_size", "4",
    "--training.device", "cpu", "--debug.seed", "0", "--debug.deterministic", "--debug.fingerprint",
    "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "5",
]  # fmt: skip


def run(folder: Path) -> Path:
    import torch

    from lockstep.config import load_config
    from lockstep.train.trainer import Trainer

    torch.set_num_threads(1)
    config = load_config("llama3_debug", [*OVERRIDES, "--job.dump_folder", str(folder / "run")])
    with Trainer(config, show_progress=False) as trainer:
        return trainer.train()


def main() -> None:
    from lockstep.train.run_folder import read_metrics

    with tempfile.TemporaryDirectory() as folder:
        records = read_metrics(run(Path(folder)))
    keep = ("step", "loss", "grad_norm", "grad_fingerprint", "param_fingerprint")
    REFERENCE.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in records))
    print(f"wrote {REFERENCE} ({len(records)} steps)", file=sys.stderr)


if __name__ == "__main__":
    main()
