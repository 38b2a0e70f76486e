"""Llama 3 dense decoder."""

from lockstep.models.llama3.args import LLAMA3_FLAVORS, Llama3Args
from lockstep.models.llama3.model import Llama3

__all__ = ["LLAMA3_FLAVORS", "Llama3", "Llama3Args"]
