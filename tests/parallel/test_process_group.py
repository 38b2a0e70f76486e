"""On CUDA each rank selects its own GPU and binds NCCL to it (checked without a GPU, by recording
the calls)."""

import torch
import torch.distributed as dist

from lockstep.parallel import process_group
from lockstep.parallel.process_group import WorldInfo


def test_cuda_ranks_select_their_gpu_and_bind_nccl_to_it(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw["device_id"])))
    process_group.init_process_group(WorldInfo(rank=3, world_size=4, local_rank=1), torch.device("cuda"))
    assert calls == [("set_device", torch.device("cuda", 1)), ("nccl", torch.device("cuda", 1))]
    calls.clear()
    process_group.init_process_group(WorldInfo(rank=1, world_size=2, local_rank=1), torch.device("cpu"))
    assert calls == [("gloo", None)]  # gloo: no device to select
