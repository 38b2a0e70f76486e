"""Start this machine's processes of a run through torchrun (``lockstep train --nproc N``)."""

from __future__ import annotations

import os
import subprocess
import sys

from lockstep.config import ConfigError


def _without_nproc(argv: list[str]) -> list[str]:
    forwarded, skip = [], False
    for arg in argv:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            forwarded.append(arg)
    return forwarded


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun --standalone with N processes (one machine), one share of
    the CPU threads each unless OMP_NUM_THREADS is set."""
    if nproc < 1:
        raise ConfigError("--nproc", f"must be >= 1; got {nproc}")
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "lockstep.train", *_without_nproc(argv)]
    return subprocess.call(command, env=os.environ | {"OMP_NUM_THREADS": threads})
