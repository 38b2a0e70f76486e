"""``python -m lockstep.train`` and ``torchrun -m lockstep.train``: same arguments as ``lockstep train``
(the command lives in lockstep.cli.train)."""

import os
import sys

from lockstep.cli import main
from lockstep.lifetime import die_with_parent

if __name__ == "__main__":
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: it stops when its launcher dies
        die_with_parent()
    code = main(["train", *sys.argv[1:]])
    # Leave without interpreter-exit destructors: after a clean destroy_process_group, gloo sometimes
    # aborts there ("terminate called without an active exception"), which torchrun would report as a
    # failed worker. Everything (metrics, checkpoints) is written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
