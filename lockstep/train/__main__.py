"""``python -m lockstep.train`` and ``torchrun -m lockstep.train``: same arguments as ``lockstep train``."""

import sys

from lockstep.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
