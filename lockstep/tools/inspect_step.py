"""Which data trained step N of a run: ``lockstep inspect RUN --step N``.

Nothing is recorded for this: the data order is a pure function of (seed, global sample index), so the
step's samples are the global batch [(N-1) B, N B) of the launch that trained it, and each sample's
window, file, document and offset follow from the run's config and its prepared data
(lockstep.data.provenance). With ``losses``, bisect's replay recomputes the step from the newest
checkpoint before it, in the run's layout, taking each sample's loss with the weights the step started
from; the replayed step loss is compared with the recorded one, bitwise.

Assumes the global batch did not change between launches (a resume with another
``training.global_batch_size`` would shift the indices); fault tolerance's shrunk steps
(``keep_global_batch = false``) are not replayable and not inspected.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from lockstep.config import load_config
from lockstep.config.job import resolve_group_batch_size, resolve_parallel_dims
from lockstep.data.loader import build_token_windows
from lockstep.data.mixture import MixtureWindows
from lockstep.data.order import SampleOrder
from lockstep.data.provenance import SampleSource, sample_sources
from lockstep.data.tokenizer import build_tokenizer
from lockstep.determinism.seeds import derived_seed
from lockstep.errors import InputError, LockstepError
from lockstep.run.jsonl import json_floats, strict_json
from lockstep.run.launches import config_for_step, env_for_step
from lockstep.tools.compare import load_series
from lockstep.tools.replay import launch_replay, read_replay

RUN_FIX = "give a run folder written by lockstep train (it holds config.toml and env.json)"
DATA_FIX = (
    "run from the folder training ran in (the run's config.toml keeps relative data paths as given), or restore "
    "the data it trained on"
)


@dataclass
class StepSamples:
    step: int
    global_batch: int
    seq_len: int
    sources: list[SampleSource]
    sample_losses: list[float] | None = None
    """Each sample's per-token loss, replayed."""
    sample_tokens: list[int] | None = None
    recorded_loss: float | None = None
    replayed_loss: float | None = None

    @property
    def loss_matches(self) -> bool | None:
        """The replayed step loss equals the recorded one bitwise (None when either is unknown)."""
        if self.recorded_loss is None or self.replayed_loss is None:
            return None
        return self.recorded_loss == self.replayed_loss

    def as_json(self) -> dict:
        return strict_json(asdict(self) | {"loss_matches": self.loss_matches})


def check_run(run: Path) -> None:
    for name in ("config.toml", "env.json"):
        if not (run / name).is_file():
            raise InputError(run, f"holds no {name}", RUN_FIX)


def step_samples(run: Path, step: int, preview_tokens: int = 48) -> StepSamples:
    """The samples of `step` and where each came from."""
    check_run(run)
    if preview_tokens < 0:
        raise InputError(run, f"--preview-tokens must be >= 0; got {preview_tokens}")
    config = load_config(str(config_for_step(run, step)), [])
    if step < 1 or step > config.training.steps:
        raise InputError(run, f"has steps 1 .. {config.training.steps}; step {step} is not one", "pick a step in range")
    env = env_for_step(run, step)  # the launch that trained the step: its world size and data
    dims = resolve_parallel_dims(config.parallelism, int(env.get("world_size", 1)))
    global_batch, _ = resolve_group_batch_size(config, dims)
    try:
        tokenizer = build_tokenizer(config.model, config.data)
        windows = build_token_windows(config.training, config.data, tokenizer)
    except LockstepError as error:
        raise InputError(run / "config.toml", f"its data cannot be read here ({error})", DATA_FIX) from None
    recorded = (env.get("fingerprints") or {}).get("dataset")
    if recorded and recorded != windows.fingerprint:
        raise InputError(
            run / "config.toml",
            f"training.dataset_path {config.training.dataset_path or config.training.dataset!r} is not the data step "
            f"{step} trained on here (fingerprint {windows.fingerprint[:12]}, the run recorded {recorded[:12]})",
            DATA_FIX,
        )
    seed = env.get("seeds", {}).get("data") or derived_seed(config.debug.seed, "data")
    shuffle = config.data.shuffle
    order = (
        windows.sample_order(seed, shuffle)
        if isinstance(windows, MixtureWindows)
        else SampleOrder(seed, windows.num_windows, shuffle)
    )
    samples = range((step - 1) * global_batch, step * global_batch)
    sources = sample_sources(windows, order, samples, tokenizer, preview_tokens)
    return StepSamples(step, global_batch, config.training.seq_len, sources)


def add_losses(run: Path, found: StepSamples) -> None:
    """Replay the step (from the newest checkpoint before it) for each sample's loss and the step loss."""
    work = Path(tempfile.mkdtemp(prefix="lockstep-inspect-"))
    try:
        launch_replay(run, found.step, work / "replay", mode="verify")
        replayed = read_replay(work / "replay")[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    found.replayed_loss = replayed["loss"]
    losses = replayed["sample_losses"]
    if losses is not None:
        found.sample_tokens = losses["tokens"]
        found.sample_losses = [
            s / t if t else math.nan for s, t in zip(losses["summed"], losses["tokens"], strict=True)
        ]
    recorded = load_series(run).get(found.step)
    if recorded is not None:
        found.recorded_loss = json_floats(recorded)["loss"]


def describe(run: Path, found: StepSamples) -> str:
    first = found.sources[0].sample if found.sources else 0
    lines = [
        f"step {found.step} of {run}: global samples {first} .. {first + found.global_batch - 1} "
        f"(global batch {found.global_batch}, seq_len {found.seq_len})"
    ]
    if found.replayed_loss is not None:
        check = {True: "bitwise equal to the recorded loss", False: f"DIFFERS from the recorded {found.recorded_loss!r}",
                 None: "the step was not logged, nothing to check against"}[found.loss_matches]  # fmt: skip
        lines.append(f"replayed step loss {found.replayed_loss!r}: {check}")
    for i, source in enumerate(found.sources):
        loss = f"  loss {found.sample_losses[i]:.4f}" if found.sample_losses is not None else ""
        where = f"{source.file or '?'}  document {source.document}  token {source.offset}"
        if source.documents > 1:
            where += f" (+{source.documents - 1} more documents)"
        lines.append(f"sample {source.sample}  window {source.window}{loss}  [{source.source}] {where}")
        lines.append(f"    {source.preview!r}")
    return "\n".join(lines)
