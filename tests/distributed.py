"""Run a test body on N ranks: fresh processes with torchrun's environment variables and one thread
each (2-core CI machine), gloo on the CPU.

The processes come from a fork server that imported lockstep's trainer (torch, torch.distributed,
the models) once per test process: a spawned rank would spend ~3.5 s of its life importing them again.
A forked rank is still a fresh interpreter state for the test body (nothing of the parent's test
state is inherited), and it takes the parent's current environment and sys.path explicitly, since the
server keeps those of the moment it started."""

from __future__ import annotations

import multiprocessing
import os
import random
import socket
import sys
from collections.abc import Callable


def free_port() -> int:
    """A port nothing listens on. Under pytest-xdist each worker draws from its own range below the
    kernel's ephemeral ports (32768 up), so two workers starting process groups at once never pick
    the same one (a port found free by one could otherwise be handed to the other before it is bound)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    first = 10000 + 2000 * int(worker[2:])
    for port in random.Random().sample(range(first, first + 2000), 2000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + 1999}")


PRELOADED = ["lockstep.train.trainer"]


def _entry(
    fn: Callable, rank: int, world_size: int, port: int, args: tuple, environment: dict, path: list[str],
    ranks_per_node: int,
) -> None:  # fmt: skip
    os.environ.clear()
    os.environ.update(environment)
    sys.path[:] = path
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % ranks_per_node),
        LOCAL_WORLD_SIZE=str(ranks_per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    import torch

    torch.set_num_threads(1)
    fn(*args)
    # Leave without running interpreter-exit destructors: gloo sometimes aborts there ("terminate
    # called without an active exception") after a clean destroy_process_group. The body's work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_processes(
    fn: Callable, world_size: int, *args, ranks_per_node: int | None = None
) -> list[multiprocessing.Process]:
    """world_size started processes that call fn(*args) as the ranks of one process group; torchrun's
    environment of `ranks_per_node` ranks per node (one node by default), as `--nnodes` launches set it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)
    port = free_port()
    here = (dict(os.environ), list(sys.path), ranks_per_node or world_size)
    processes = [context.Process(target=_entry, args=(fn, r, world_size, port, args, *here)) for r in range(world_size)]
    for p in processes:
        p.start()
    return processes


def run_on_ranks(fn: Callable, world_size: int, *args, timeout: float = 300, ranks_per_node: int | None = None) -> None:
    """Call fn(*args) in world_size fresh processes; raise if any rank fails or hangs."""
    processes = rank_processes(fn, world_size, *args, ranks_per_node=ranks_per_node)
    for p in processes:
        p.join(timeout)
    hung = [r for r, p in enumerate(processes) if p.is_alive()]
    for p in processes:
        if p.is_alive():
            p.kill()
    failed = {r: p.exitcode for r, p in enumerate(processes) if p.exitcode not in (0, None)}
    assert not hung and not failed, f"ranks hung: {hung}, ranks failed (exit codes): {failed}"


def run_in_folder(fn: Callable, world_size: int, folder, *args) -> None:
    """fn(folder, *args) in this process when world_size is 1 (no process group), else on
    world_size ranks; the folder is created first."""
    folder.mkdir(parents=True, exist_ok=True)
    if world_size == 1:
        fn(folder, *args)
    else:
        run_on_ranks(fn, world_size, folder, *args)
