"""Loss memory at large vocabularies (issue 11): loss parallelism under TP, the chunked loss under PP.

Under TP 2 the output projection's logits stay sharded over the vocabulary (each rank holds V/2 of
them) and the cross-entropy runs on the shards; the run stays within TP's 1e-5 of one process. A
pipeline's last stage with training.loss_chunk_tokens returns the microbatch loss instead of logits,
bitwise equal to one process with the same chunking.
"""

import json
import os

import pytest
import torch
from torch.distributed.tensor import DTensor, Shard

from lockstep.config import load_config, validate_job_config
from lockstep.config.errors import ConfigError
from lockstep.train.trainer import Trainer
from tests.distributed import run_in_folder
from tests.helpers import save_rank_weights, tiny_config
from tests.parallel.test_layouts import DETERMINISTIC, SAME_BATCH, _assert_close, _pipeline, _result

STEPS = [*DETERMINISTIC, "--training.steps", "3"]
LOOSE = [*SAME_BATCH, "--debug.fingerprint", "--training.steps", "3"]  # debug.deterministic keeps logits whole
CHUNKED = [*STEPS, "--training.loss_chunk_tokens", "24"]  # 64 tokens per microbatch: a ragged last chunk
TP2 = ["--parallelism.tensor_parallel_degree", "2"]


def _train_recording_outputs(folder, overrides: list[str]) -> None:
    """Train, and record what the output projection returned (type, placements, local shape) and what
    each last pipeline stage returned, per rank."""
    with Trainer(tiny_config(folder, *overrides), show_progress=False) as trainer:
        seen = {"vocab": trainer.tokenizer.vocab_size, "logits": [], "stage_outputs": []}

        def on_logits(module, args, output) -> None:
            local = output.to_local() if isinstance(output, DTensor) else output
            placements = [str(p) for p in output.placements] if isinstance(output, DTensor) else None
            seen["logits"].append({"dtensor": isinstance(output, DTensor), "placements": placements,
                                   "local_shape": list(local.shape)})  # fmt: skip

        for part in trainer.model.parts:
            if part.output is not None:
                part.output.register_forward_hook(on_logits)
                part.register_forward_hook(lambda m, a, out: seen["stage_outputs"].append(list(out.shape)))
        trainer.train()
        save_rank_weights(trainer, folder)
    (folder / f"outputs.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))


def _run(folder, world_size: int, overrides: list[str]):
    run_in_folder(_train_recording_outputs, world_size, folder, overrides)
    seen = [json.loads(f.read_text()) for f in sorted(folder.glob("outputs.*.json"))]
    return _result(folder), seen


@pytest.fixture(scope="module")
def one_process_loose(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one-loose"), 1, LOOSE)


@pytest.mark.parametrize("loss_parallel", [True, False], ids=["loss-parallel", "gathered-logits"])
def test_tensor_parallel_loss_is_within_1e5_and_logits_stay_vocab_sharded(tmp_path, one_process_loose, loss_parallel):
    overrides = [*LOOSE, *TP2, "--parallelism.loss_parallel", str(loss_parallel).lower()]
    result, seen = _run(tmp_path, 2, overrides)
    _assert_close(*result, one_process_loose[0], rtol=1e-5)
    assert len(seen) == 2
    for rank in seen:
        vocab, logits = rank["vocab"], rank["logits"]
        assert len(logits) == 3 * 4  # 3 steps of 4 microbatches
        for record in logits:
            if loss_parallel:  # this rank's half of the vocabulary, never [B, S, V]
                assert record["dtensor"] and record["placements"] == [str(Shard(2))]
                assert record["local_shape"] == [2, 32, vocab // 2]
            else:
                assert not record["dtensor"] and record["local_shape"] == [2, 32, vocab]


@pytest.fixture(scope="module")
def one_process_chunked(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one-chunked"), 1, CHUNKED)[0]


@pytest.mark.parametrize("world_size", [2, 4], ids=["pp2", "pp2xfsdp2"])
def test_pipeline_chunked_loss_is_bitwise_identical_to_one_process(tmp_path, one_process_chunked, world_size):
    """PP 2 with loss_chunk_tokens: the last stage's forward takes the chunked loss (its labels split
    by microbatch with the tokens), so no stage returns logits, and the run is bitwise one process's;
    also when the last stage is an FSDP root (its output weight gathered for that forward)."""
    reference = one_process_chunked
    (metrics, weights), seen = _run(tmp_path, world_size, [*CHUNKED, *_pipeline(2, "1F1B")])
    assert len(metrics) == 3 and all(m[3] and m[4] for m in metrics)
    assert metrics == reference[0]
    assert weights.keys() == reference[1].keys()
    assert all(torch.equal(weights[k], reference[1][k]) for k in weights)
    last_stage = [rank for rank in seen if rank["stage_outputs"]]
    assert len(last_stage) == world_size // 2
    for rank in last_stage:
        assert rank["logits"] == []  # the output module's own forward never ran
        assert set(map(tuple, rank["stage_outputs"])) == {()}  # a scalar loss per microbatch


def test_chunked_loss_with_tensor_parallelism_is_refused_in_one_line(tmp_path):
    config = tiny_config(tmp_path, "--training.loss_chunk_tokens", "64", *TP2)
    with pytest.raises(ConfigError, match="loss parallelism already shards the logits") as refused:
        validate_job_config(config, world_size=2)
    assert "\n" not in str(refused.value)
    validate_job_config(tiny_config(tmp_path, "--training.loss_chunk_tokens", "64"), world_size=1)
    with pytest.raises(ConfigError, match="did you mean 'parallelism.loss_parallel'"):
        load_config("llama3_debug", ["--parallelism.loss_paralel", "false"])
