"""Initialisation, grad norm and fingerprints work on each rank's shards: no full parameter is
gathered or scattered, and one process, FSDP 2 and TP 2 agree (bitwise where the numbers allow)."""

import torch
import torch.distributed as dist

from lockstep.parallel.canonical import grad_norm_fp64
from lockstep.train.observe.fingerprint import model_fingerprint
from lockstep.train.trainer import Trainer
from tests.distributed import run_on_ranks
from tests.helpers import tiny_config

TP2 = ["--parallelism.tensor_parallel_degree", "2"]
LAYOUTS = {"one": (1, []), "fsdp2": (2, []), "tp2": (2, TP2), "fsdp2xtp2": (4, TP2)}  # the last: strided shards


class CountCollectives:
    """Counts the torch.distributed collectives issued inside the block."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "scatter", "reduce_scatter_tensor")

    def __enter__(self):
        self.count, self.saved = 0, {name: getattr(dist, name) for name in self.NAMES}
        for name, fn in self.saved.items():
            setattr(dist, name, self._counting(fn))
        return self

    def _counting(self, fn):
        def call(*args, **kwargs):
            self.count += 1
            return fn(*args, **kwargs)

        return call

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _measure(folder, overrides: list[str]) -> None:
    with Trainer(
        tiny_config(folder, "--debug.deterministic", "--debug.deterministic_chunks", "2", *overrides),
        show_progress=False,
    ) as trainer:
        named = dict(trainer.named_params)
        with CountCollectives() as counted:
            norm = grad_norm_fp64(named, trainer.model.param_names, trainer.reducer.pp_group)
            fingerprint = model_fingerprint(named, trainer.model.param_names, trainer.reducer.pp_group)
        before = trainer.full_weights()
        with CountCollectives() as init_collectives:
            for part in trainer.model.parts:
                part.init_weights(trainer.config.debug.seed, trainer.device)
        assert init_collectives.count == 0
        assert all(torch.equal(before[k], v) for k, v in trainer.full_weights().items())  # re-init: same
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(
                {"weights": before, "norm": norm, "fingerprint": fingerprint, "collectives": counted.count},
                folder / "result.pt",
            )


def test_one_process_fsdp_and_tp_start_from_the_same_weights_norm_and_fingerprint(tmp_path):
    results = {}
    for layout, (world_size, overrides) in LAYOUTS.items():
        folder = tmp_path / layout
        folder.mkdir()
        if world_size == 1:
            _measure(folder, overrides)
        else:
            run_on_ranks(_measure, world_size, folder, overrides)
        results[layout] = torch.load(folder / "result.pt")
    one = results["one"]
    for layout in ("fsdp2", "tp2", "fsdp2xtp2"):
        assert all(torch.equal(one["weights"][k], v) for k, v in results[layout]["weights"].items()), layout
        assert results[layout]["fingerprint"] == one["fingerprint"], layout
    assert torch.equal(results["fsdp2"]["norm"], one["norm"])
    for layout in ("tp2", "fsdp2xtp2"):  # TP splits the row sums of row-parallel weights
        torch.testing.assert_close(results[layout]["norm"], one["norm"], rtol=1e-6, atol=0)
    assert one["collectives"] == 0
    assert results["fsdp2"]["collectives"] == 2  # one all-reduce each for the norm and the fingerprint
    assert results["tp2"]["collectives"] == 2
    # One per (mesh, sharded axis): the TP-split linears on (dp_shard, tp), and under debug.deterministic's
    # canonical TP the embedding and norms, whole on every tp rank, sharded by FSDP on dp_shard alone.
    assert results["fsdp2xtp2"]["collectives"] == 6
