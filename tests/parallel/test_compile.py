"""Compiled blocks against eager in the same layout (FSDP 2 with full AC, PP 2, MoE under FSDP 2, Qwen3-MoE
under FSDP 2 with full AC):
losses within 1e-5 relative, parameter names unchanged, FSDP's hooks outside the compiled region, and
one graph per block shape however many blocks there are.

Compiling costs 15-20 s per process on CPU, so one pair of processes runs every layout, eager then
compiled, and reports to files that the test reads.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch._dynamo.utils import counters
from torch.distributed.fsdp import FSDPModule

from lockstep.config.sections import CompileConfig, ModelConfig
from lockstep.models.registry import model_args
from lockstep.parallel.compile import apply_compile
from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.distributed import free_port, run_on_ranks
from tests.helpers import tiny_config

BATCH = ["--training.steps", "3", "--training.global_batch_size", "8", "--training.local_batch_size", "2"]
PP2 = [
    "--parallelism.pipeline_parallel_degree", "2",
    "--parallelism.pipeline_parallel_schedule", "1F1B",
    "--parallelism.pipeline_parallel_microbatch_size", "2",
]  # fmt: skip
LAYOUTS: dict[str, tuple[list[str], int, int]] = {
    # name: (overrides, compiled graphs (one per distinct piece, whatever the number of blocks), FSDP blocks per rank)
    "fsdp2-ac-full": (["--activation_checkpoint.mode", "full"], 1, 2),
    "pp2": (PP2, 1, 0),
    # 1 dense + 3 MoE blocks: the dense block, and the MoE blocks' norm, attention, router, shared experts.
    "moe-fsdp2": (["--model.name", "deepseek_v3", "--model.flavor", "debug"], 5, 4),
    # 4 MoE blocks with QK-norm attention, full AC: the norms (one graph for both), attention, router.
    "qwen3-moe-fsdp2-ac-full": (
        ["--model.name", "qwen3_moe", "--model.flavor", "debug", "--activation_checkpoint.mode", "full"],
        3,
        4,
    ),
}
COMPILE = ["--compile.enable", "--compile.components", "model"]


def _is_compiled(forward) -> bool:
    return hasattr(forward, "_torchdynamo_orig_callable")


def _train_layouts(folder, ports: list[int]) -> None:
    """Every layout, eager then compiled; each rank records its parameter names, graph count and
    where FSDP's hooks run. `ports`: one free port per process group, chosen by the test (free when
    chosen, unlike neighbours of MASTER_PORT, which another socket may hold)."""
    rank = os.environ["RANK"]
    # Two blocks per model: were blocks compiled one graph each, the second would raise (not fall back).
    torch._dynamo.config.recompile_limit = 1
    for index, (name, (overrides, _, _)) in enumerate(LAYOUTS.items()):
        for mode in ("eager", "compiled"):
            # A fresh store per process group: on the old port a fast rank can join the group being torn down.
            os.environ["MASTER_PORT"] = str(ports[2 * index + (mode == "compiled")])
            torch._dynamo.reset()
            counters.clear()
            run = folder / name / mode
            config = tiny_config(run, *BATCH, *overrides, *(COMPILE if mode == "compiled" else []))
            with Trainer(config, show_progress=False) as trainer:
                blocks = [block for part in trainer.model.parts for block in part.layers.values()]
                record = {
                    "names": [n for part in trainer.model.parts for n, _ in part.named_parameters()],
                    # FSDP's hooks stay in Module.__call__, which is not compiled; forward is.
                    "call_compiled": any(block._compiled_call_impl is not None for block in blocks),
                    "fsdp_blocks": sum(isinstance(block, FSDPModule) for block in blocks),
                    "blocks": len(blocks),
                    # Whole (dense) or piecewise (MoE): see lockstep.parallel.compile.
                    "compiled_blocks": sum(
                        _is_compiled(block.forward) or any(_is_compiled(c.forward) for c in block.children())
                        for block in blocks
                    ),
                }
                trainer.train()
            record["graphs"] = counters["stats"]["unique_graphs"]
            (run / f"rank{rank}.json").write_text(json.dumps(record))


def test_compiled_layouts_match_eager(tmp_path):
    ports = sorted({free_port() for _ in range(4 * len(LAYOUTS))})[: 2 * len(LAYOUTS)]  # distinct
    run_on_ranks(_train_layouts, 2, tmp_path, ports, timeout=420)
    for name, (_, graphs, fsdp_blocks) in LAYOUTS.items():
        eager, compiled = (read_metrics(tmp_path / name / mode / "run") for mode in ("eager", "compiled"))
        assert len(eager) == len(compiled) == 3, name
        for e, c in zip(eager, compiled, strict=True):
            assert abs(c["loss"] - e["loss"]) <= 1e-5 * e["loss"], (name, e["step"], e["loss"], c["loss"])
        for rank in range(2):
            eager_record, compiled_record = (
                json.loads((tmp_path / name / mode / f"rank{rank}.json").read_text()) for mode in ("eager", "compiled")
            )
            assert compiled_record["names"] == eager_record["names"], name  # no "_orig_mod." anywhere
            assert eager_record["graphs"] == 0 and compiled_record["graphs"] == graphs, name
            assert not compiled_record["call_compiled"], name
            assert eager_record["compiled_blocks"] == 0, name
            assert compiled_record["compiled_blocks"] == compiled_record["blocks"] > 0, name
            assert compiled_record["fsdp_blocks"] == eager_record["fsdp_blocks"] == fsdp_blocks, name


def test_one_graph_however_many_blocks():
    """Ten Llama blocks (more than dynamo's default recompile limit of 8) compile to one graph, as two do."""
    graphs = []
    for n_layers in (2, 10):
        spec, args = model_args(ModelConfig(flavor="tiny"), 97, 16)
        with torch.device("meta"):
            model = spec.build(dataclasses.replace(args, n_layers=n_layers), "sdpa")
        names = [n for n, _ in model.named_parameters()]
        apply_compile(model.layers, CompileConfig(enable=True, components=["model"]))
        assert [n for n, _ in model.named_parameters()] == names
        assert all(_is_compiled(block.forward) for block in model.layers.values())
        model.init_weights(0, "cpu")
        torch._dynamo.reset()
        counters.clear()
        model(torch.randint(0, 97, (2, 16))).sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1]
