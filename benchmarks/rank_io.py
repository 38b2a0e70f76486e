"""One rank's file-system work as rank r of a W-rank job (issue 26), counted, not timed.

Two plays, each counted with the audit-hook counter (lockstep/tools/scale/io_counter.py: opens, stats,
listings, memory maps, fsyncs, bytes):

- ``data``: the data path alone on a prepared folder: start-up (the manifest, the windows, the loader)
  and each step's data (its own microbatches, the read-ahead of the next step, the step's valid-token
  count). The world size only changes which samples are the rank's.
- ``trainer``: the whole trainer on a mirror process group of W ranks (lockstep/tools/scale/rank_play.py):
  start-up, each step, a checkpoint save, and a second launch that resumes from it (the load nested in
  it), for rank 0 (which also writes the run folder and publishes the checkpoint) and rank W/2 + 1.

``--checkout`` measures another revision's lockstep with this checkout's counter and harness (the
"before" figures in BENCHMARKS.md).

    .venv/bin/python benchmarks/rank_io.py [--world 64 512] [--shards 1024] [--steps 3] [--checkout DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = "the of and to in is was for on that with as by at from his her it an be this which or are".split()


def _scale_tool(name: str):
    """lockstep.tools.scale.`name` of this checkout, whichever lockstep is imported (an older one lacks
    them): registered under its own name, so the harness's imports of the counter find this one."""
    qualified = f"lockstep.tools.scale.{name}"
    spec = importlib.util.spec_from_file_location(qualified, HERE.parent / f"lockstep/tools/scale/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _counter():
    return _scale_tool("io_counter").counting_file_ops


def _corpus(folder: Path, documents: int) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400)))}) + "\n")


def _prepared(work: Path, shards: int) -> Path:
    from lockstep.data.prepare import prepare
    from lockstep.data.shard_plan import plan_files
    from lockstep.data.sources import file_source
    from lockstep.data.tokenizer import BytesTokenizer

    _corpus(work / "in", documents=shards * 6)
    size = (work / "in" / "corpus.jsonl").stat().st_size
    source, tasks = plan_files(file_source("json", str(work / "in"), "text"), max(1024, size // shards))
    prepare(source, tasks, str(work / "in"), BytesTokenizer(), work / "out", show_progress=False, log=lambda _: None)
    return work / "out"


def play(folder: Path, world: int, rank: int, steps: int, seq_len: int, local_batch: int) -> dict:
    from lockstep.data.loader import DataLoader

    try:
        from lockstep.data.dataset import load_prepared_windows
    except ImportError:  # a checkout from before it moved (--checkout)
        from lockstep.data.prepared import load_prepared_windows
    from lockstep.data.tokenizer import BytesTokenizer

    counting = _counter()
    shards = folder / "shards"
    with counting() as start:
        windows = load_prepared_windows(folder, BytesTokenizer(), seq_len)
        loader = DataLoader(windows, seed=3, global_batch=world * local_batch, local_batch=local_batch)
        loader.sum_over_ranks = lambda counts: counts  # the integer all-reduce: one rank plays, no peers
    per_step = []
    for _ in range(steps):
        with counting() as ops:
            loader.next_step(rank, world)
            loader._ahead[1].result()  # the read-ahead of the next step belongs to this step's work
        per_step.append(ops.as_record() | {"shard_files": len(ops.opened_under(shards))})
    return {
        "world": world,
        "rank": rank,
        "shard_files_total": sum(1 for p in shards.iterdir() if p.suffix in (".tokens", ".docs")),
        "start_up": start.as_record() | {"shard_files": len(start.opened_under(shards))},
        "per_step": per_step,
    }


def play_trainer(folder: Path, work: Path, world: int, rank: int, steps: int) -> dict:
    _scale_tool("io_counter")
    _scale_tool("mirror")
    rank_play = _scale_tool("rank_play")
    run = work / f"run-{world}-{rank}"
    played = rank_play.play(rank, world, dataset=folder, dump_folder=run, steps=steps)
    record = played.as_record({"shards": folder / "shards", "checkpoint": run / "checkpoint"})
    shutil.rmtree(run)  # W ranks' checkpoint files
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--shards", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--local-batch", type=int, default=1)
    parser.add_argument("--plays", nargs="+", choices=["data", "trainer"], default=["data", "trainer"])
    parser.add_argument("--checkout", type=Path, default=None, help="measure this checkout's lockstep instead")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "rank_io.json")
    args = parser.parse_args()
    if args.checkout is not None:
        sys.path.insert(0, str(args.checkout.resolve()))
    import lockstep

    rows, trainer_rows = [], []
    with tempfile.TemporaryDirectory() as work:
        folder = _prepared(Path(work), args.shards)
        for world in args.world if "trainer" in args.plays else []:
            for rank in (0, world // 2 + 1):
                result = play_trainer(folder, Path(work), world, rank, args.steps)
                trainer_rows.append(result)
                print(
                    f"trainer W={world:4d} rank {rank:3d}: " + "; ".join(
                        f"{phase} {result[phase]['opens']} opens {result[phase]['stats']} stats "
                        f"{result[phase]['listings']} listings {result[phase]['fsyncs']} fsyncs"
                        for phase in ("start_up", "save", "resume", "load")
                    ) + f"; initialised {result['initialised']}",
                    flush=True,
                )  # fmt: skip
        for world in args.world if "data" in args.plays else []:
            result = play(folder, world, world // 2 + 1, args.steps, args.seq_len, args.local_batch)
            rows.append(result)
            step = result["per_step"][-1]
            print(
                f"W={world:4d} rank {result['rank']:3d}: start-up opens {result['start_up']['opens']:4d} files "
                f"({result['start_up']['shard_files']} of {result['shard_files_total']} shard files), "
                f"{result['start_up']['stats']:5d} stats; a step opens {step['shard_files']:4d} shard files, "
                f"{step['stats']:4d} stats, {step['maps']:4d} maps",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"lockstep": str(Path(lockstep.__file__).parent), "shards": args.shards, "rows": rows}
    record["trainer"] = trainer_rows
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
