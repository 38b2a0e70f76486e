"""lockstep.tools.replay.checkpoint_before: a replay of step K starts from the newest intact full
checkpoint before K; a model-only one and a damaged one (a file's size unlike its manifest's) are passed
over, and with none it starts from the initial weights (None). The step folders are published here
with lockstep.checkpoint.folders; no model is built."""

import dataclasses

from lockstep.checkpoint import folders
from lockstep.config.sections import ModelConfig
from lockstep.models.registry import model_args
from lockstep.tools.replay import checkpoint_before

FULL, MODEL_ONLY, DAMAGED = (2, 4, 10), (6,), (8,)
ARGS = dataclasses.asdict(model_args(ModelConfig(flavor="tiny"), 97, 32)[1])


def _publish(root, step: int, model_only: bool) -> None:
    partial = folders.partial_folder(root, step)
    partial.mkdir(parents=True)
    (partial / "data.bin").write_bytes(b"w" * 64)
    manifest = {"step": step, "model": {"name": "llama3", "args": ARGS}} | ({"model_only": True} if model_only else {})
    folders.publish(partial, folders.step_folder(root, step), manifest)


def test_the_replay_starts_from_the_newest_intact_full_checkpoint_before_the_step(tmp_path):
    root = tmp_path / "checkpoint"
    for step in sorted(FULL + MODEL_ONLY + DAMAGED):
        _publish(root, step, step in MODEL_ONLY)
    for step in DAMAGED:
        (folders.step_folder(root, step) / "data.bin").write_bytes(b"w" * 63)
    problems = {s: folders.problem_with(folders.step_folder(root, s), content=False) for s in FULL + DAMAGED}
    assert all(problems[s] is None for s in FULL) and all("has 63 bytes" in problems[s] for s in DAMAGED)
    for step in range(1, 13):
        earlier = [s for s in FULL if s < step]
        assert checkpoint_before(tmp_path, step) == (max(earlier) if earlier else None), step
