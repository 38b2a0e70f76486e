"""Multi-rank behaviour beyond numerics: ranks agree on stopping, FSDP computes in bf16."""

import os
import signal
import threading
import time

import torch

from lockstep.parallel.canonical import TreeReduceScatter
from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.distributed import run_on_ranks
from tests.helpers import tiny_config


def _signal_one_rank(folder) -> None:
    """Only rank 1 gets SIGTERM; without agreement rank 0 would wait in the next collective forever."""
    with Trainer(tiny_config(folder, "--training.steps", "500"), show_progress=False) as trainer:
        if trainer.world.rank == 1:

            def send_after_two_steps() -> None:
                while trainer.state.step < 2:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGTERM)

            threading.Thread(target=send_after_two_steps, daemon=True).start()
        trainer.train()
        steps = torch.tensor([trainer.state.step])
        gathered = [torch.zeros_like(steps) for _ in range(2)]
        torch.distributed.all_gather(gathered, steps)
        assert gathered[0].item() == gathered[1].item() < 500


def test_ranks_stop_after_the_same_step(tmp_path):
    run_on_ranks(_signal_one_rank, 2, tmp_path, timeout=120)
    logged = read_metrics(tmp_path / "run")
    assert 2 <= logged[-1]["step"] < 500


GLOBAL_BATCH = ["--training.global_batch_size", "4"]


def _train_bf16(folder) -> None:
    config = tiny_config(folder, *GLOBAL_BATCH, "--training.mixed_precision", "bf16")
    with Trainer(config, show_progress=False) as trainer:
        seen = []  # what reaches the attention: bf16 activations, the fp32 RoPE table
        block = trainer.model.parts[0].layers["0"]
        block.attention.register_forward_pre_hook(lambda _, args: seen.append((args[0].dtype, args[1].dtype)))
        trainer.train()
        assert set(seen) == {(torch.bfloat16, torch.float32)}
        assert block.attention.wq.weight.dtype == torch.float32  # sharded master weights stay fp32
        # bf16 gradients are cast to fp32 and summed in the canonical tree, as in fp32
        groups = block._get_fsdp_state()._fsdp_param_groups
        assert all(isinstance(g._reduce_scatter_comm, TreeReduceScatter) for g in groups)


def test_fsdp_bf16_tracks_fp32(tmp_path):
    """FSDP's policy computes in bf16 and reduces in fp32, and the RoPE table reaches the blocks in fp32 (it
    is applied in fp32); the loss stays near the fp32 run."""
    run_on_ranks(_train_bf16, 2, tmp_path / "bf16")
    with Trainer(tiny_config(tmp_path / "fp32", *GLOBAL_BATCH), show_progress=False) as trainer:
        trainer.train()
    bf16 = [m["loss"] for m in read_metrics(tmp_path / "bf16" / "run")]
    fp32 = [m["loss"] for m in read_metrics(tmp_path / "fp32" / "run")]
    assert bf16 != fp32
    assert all(abs(a - b) < 0.02 * b for a, b in zip(bf16, fp32, strict=True))


def _fail_on_rank_0(folder) -> None:
    """Rank 0 fails inside the run; rank 1 is busy for a long while and never reaches the closing
    barrier. Rank 0 must still leave at once (it writes how long its close took)."""
    try:
        with Trainer(tiny_config(folder, "--training.steps", "1"), show_progress=False) as trainer:
            trainer.train()
            if trainer.world.rank == 1:
                time.sleep(30)  # stands for a rank stuck elsewhere (a hung collective, a slow save)
                os._exit(0)
            started = time.monotonic()
            raise RuntimeError("rank 0 fails")
    except RuntimeError:
        (folder / "close_seconds").write_text(str(time.monotonic() - started))


def test_a_failed_rank_does_not_wait_in_the_closing_barrier(tmp_path):
    from tests.distributed import rank_processes

    ranks = rank_processes(_fail_on_rank_0, 2, tmp_path)
    ranks[0].join(60)
    ranks[1].kill()
    ranks[1].join()
    assert float((tmp_path / "close_seconds").read_text()) < 5  # with the barrier: until rank 1 arrives (30 s)
