"""DeepSeek-V3-style mixture-of-experts decoder."""

from lockstep.models.deepseek_v3.args import DEEPSEEK_V3_FLAVORS, DeepSeekV3Args
from lockstep.models.deepseek_v3.model import DeepSeekV3

__all__ = ["DEEPSEEK_V3_FLAVORS", "DeepSeekV3", "DeepSeekV3Args"]
