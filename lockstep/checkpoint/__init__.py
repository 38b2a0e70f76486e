"""Checkpoints: torch.distributed.checkpoint folders published atomically, and Hugging Face interop."""
