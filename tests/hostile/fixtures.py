"""What the hostile cases tamper with, built once per session (seconds): a tiny trained run with
checkpoints at steps 4 and 8 and fingerprints, its Hugging Face export (with the built-in tokenizer's
tokenizer.json beside it, so generate can read it), a generated JSON Lines corpus and its prepared
folder (bytes tokenizer). Cases never write here: each copies what it tampers with into its own folder,
and the harness checks that every file under `root` is unchanged afterwards."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.checkpoint.helpers import CHECKPOINTED
from tests.helpers import tiny_overrides

WORDS = "the of and to in is was for on that with as by at from his her it an be this which or are é 語".split()
RESUME_STEPS = "9"
"""A resume trains one step past the newest checkpoint (8), or five past the older one (4)."""


@dataclass(frozen=True)
class Fixtures:
    root: Path
    """Everything below is under it; the harness snapshots it around every case."""
    run: Path
    hf: Path
    texts: Path
    """A JSON Lines file of generated documents."""
    prepared: Path
    sentinel: Path
    """A file outside every case folder that crafted paths and links point at."""


def run_overrides(folder: Path) -> list[str]:
    """The training run's overrides with its run folder at folder/run: a resume must repeat them."""
    return ["--config", "llama3_debug", *tiny_overrides(folder), *CHECKPOINTED, "--debug.fingerprint"]


def resume_argv(folder: Path) -> list[str]:
    """``lockstep train`` resuming the copy of the run at folder/run, one step past its newest checkpoint."""
    return ["train", *run_overrides(folder), "--training.steps", RESUME_STEPS]


def prepared_train_argv(folder: Path, dataset: Path, *more: str) -> list[str]:
    """One training step on a prepared folder made with the bytes tokenizer."""
    return [
        "train", "--config", "llama3_debug", *tiny_overrides(folder), "--model.tokenizer", "bytes",
        "--training.dataset", "prepared", "--training.dataset_path", str(dataset), "--training.steps", "1", *more,
    ]  # fmt: skip


def documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) for _ in range(count)]


def _cli(argv: list[str]) -> None:
    """Run a building command quietly; fail loudly (with its output) if it does not succeed."""
    from lockstep.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main([str(a) for a in argv])
    if code != 0:
        raise RuntimeError(
            f"building a fixture failed: lockstep {' '.join(map(str, argv))} -> {code}\n{out.getvalue()}"
        )


def build_fixtures(root: Path) -> Fixtures:
    """Train, export and prepare once (the built-in corpus and tokenizer land in LOCKSTEP_CACHE)."""
    from lockstep.config.sections import DataConfig, ModelConfig
    from lockstep.data.tokenizer import build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    _cli(["train", *run_overrides(root), "--training.steps", "8"])
    _cli(["eval", root / "run", "--validation.steps", "1"])  # the validation split, tokenized into the cache
    hf = root / "hf"
    _cli(["convert", "to-hf", root / "run", hf])
    shutil.copy(build_tokenizer(ModelConfig(), DataConfig()).path, hf / "tokenizer.json")
    texts = root / "texts" / "docs.jsonl"
    texts.parent.mkdir()
    texts.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents(300))))
    prepared = root / "prepared"
    _cli(["data", "prepare", "--dataset", "json", "--dataset-path", texts, "--tokenizer", "bytes", "--out", prepared,
          "--workers", "1", "--shard-mb", "0.02", "--no-progress"])  # fmt: skip
    sentinel = root / "sentinel" / "secret.txt"
    sentinel.parent.mkdir()
    sentinel.write_text("a file no lockstep command may read as its own, or change\n" * 4)
    return Fixtures(root=root, run=root / "run", hf=hf, texts=texts, prepared=prepared, sentinel=sentinel)
