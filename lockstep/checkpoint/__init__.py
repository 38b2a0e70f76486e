"""Checkpoints: torch.distributed.checkpoint folders published atomically, and Hugging Face interop."""

import warnings

warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized", UserWarning)
"""DCP says so on every single-process load and save (generate, eval, convert): lockstep means it, and the
two lines would stand between a user and the one line that matters."""
