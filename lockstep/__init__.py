"""lockstep: PyTorch-native LLM pre-training with bitwise-repeatable, layout-invariant numerics."""

__version__ = "0.1.0"
