"""``torchrun -m lockstep.cli.worker COMMAND ARGS``: one rank of a lockstep command other than train
(which has ``-m lockstep.train``), as ``lockstep COMMAND --nproc N`` starts them (lockstep.cli.launch)."""

import os
import sys

from lockstep.cli import main
from lockstep.lifetime import die_with_parent

if __name__ == "__main__":
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: it stops when its launcher dies
        die_with_parent()
    code = main(sys.argv[1:])
    # Leave without interpreter-exit destructors: after a clean destroy_process_group, gloo sometimes
    # aborts there, which torchrun would report as a failed worker. Everything is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
