"""Llama 4 text models (Scout and Maverick shapes; the vision encoder is out of scope)."""

from lockstep.models.llama4.args import LLAMA4_FLAVORS, Llama4Args
from lockstep.models.llama4.model import Llama4

__all__ = ["LLAMA4_FLAVORS", "Llama4", "Llama4Args"]
