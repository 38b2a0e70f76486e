"""Regenerate the reference losses when a numerics change is intended (and say why in the commit):

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.assets.losses.regenerate            # all of them
    OMP_NUM_THREADS=1 .venv/bin/python -m tests.assets.losses.regenerate qwen3_debug  # one

20 steps of each debug preset (seq 128, batch 4, seed 0, deterministic, one thread) on the CPU; the
test in tests/tools/test_reference_losses.py asserts a rerun equals each file bitwise.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

FOLDER = Path(__file__).parent
REFERENCES = {
    config: FOLDER / f"{config}_cpu.jsonl"
    for config in ("llama3_debug", "qwen3_debug", "qwen3_moe_debug", "llama4_debug")
}
"""Preset -> its reference file."""
REFERENCE = REFERENCES["llama3_debug"]
OVERRIDES = [
    "--training.steps", "20", "--training.seq_len", "128", "--training.local_batch_size", "4",
    "--training.device", "cpu", "--debug.seed", "0", "--debug.deterministic", "--debug.fingerprint",
    "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "5",
]  # fmt: skip


def run(folder: Path, config: str = "llama3_debug") -> Path:
    import torch

    from lockstep.config import load_config
    from lockstep.train.trainer import Trainer

    torch.set_num_threads(1)
    job = load_config(config, [*OVERRIDES, "--job.dump_folder", str(folder / "run")])
    with Trainer(job, show_progress=False) as trainer:
        return trainer.train()


def main(configs: list[str]) -> None:
    from lockstep.run.folder import read_metrics

    for config in configs or REFERENCES:
        with tempfile.TemporaryDirectory() as folder:
            records = read_metrics(run(Path(folder), config))
        keep = ("step", "loss", "grad_norm", "grad_fingerprint", "param_fingerprint")
        REFERENCES[config].write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in records))
        print(f"wrote {REFERENCES[config]} ({len(records)} steps)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
