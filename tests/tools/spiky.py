"""The spiky run shared by tests/tools/test_forensics.py and test_inspect_step.py (the ``spiky`` fixture,
tests/tools/conftest.py): the tiny Llama trained on a corpus of simple sentences that holds one
pathological document (random CJK characters, bytes the model never learns to expect)."""

import json
import random

from lockstep.config import load_config
from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer

PATHOLOGICAL = 60
"""The document number (line) of the random characters in the corpus file."""
WINDOW = 8
STEPS = 30


def _write_corpus(path) -> None:
    rng = random.Random(0)
    nouns = "cat dog bird fish horse cow king queen ship house tree river".split()
    verbs = "sees likes finds chases follows keeps builds paints".split()
    adjectives = "red big small old new quiet fast slow".split()
    documents = [
        " ".join(
            f"the {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}."
            for _ in range(rng.randint(3, 6))
        )
        for _ in range(120)
    ]
    documents.insert(PATHOLOGICAL, "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(200)))
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))


def _train(folder, corpus, *overrides: str) -> list[dict]:
    config = load_config("llama3_debug", [
        "--job.dump_folder", str(folder), "--model.flavor", "tiny", "--model.tokenizer", "bytes",
        "--training.dataset", "json", "--training.dataset_path", str(corpus), "--training.steps", str(STEPS),
        "--training.local_batch_size", "2", "--training.seq_len", "32", "--training.device", "cpu",
        "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
        "--debug.seed", "7", "--debug.fingerprint", "--checkpoint.enable", "--checkpoint.interval", "10",
        *overrides,
    ])  # fmt: skip
    with Trainer(config, show_progress=False) as trainer:
        trainer.train()
    return read_metrics(folder)


def _spikes(run) -> list[dict]:
    return [json.loads(line) for line in (run / "spikes.jsonl").read_text().splitlines()]
