"""Qwen3, dense (``qwen3``) and mixture-of-experts (``qwen3_moe``): one architecture, two flavor tables."""

from lockstep.models.qwen3.args import QWEN3_FLAVORS, QWEN3_MOE_FLAVORS, Qwen3Args
from lockstep.models.qwen3.model import Qwen3

__all__ = ["QWEN3_FLAVORS", "QWEN3_MOE_FLAVORS", "Qwen3", "Qwen3Args"]
