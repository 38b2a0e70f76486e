"""A simulated silent hardware fault, loaded through job.custom_config_module and switched on by the
environment (so a replay of the run on a "healthy machine" does not repeat it): with
LOCKSTEP_TEST_FAULT=RANK:STEP, on that rank at that step only, every feed-forward output is off by one
part in 2^20, as a flipped low mantissa bit in one machine's arithmetic would make it."""

import os

from lockstep.models.llama3 import model as llama3_model
from tests.assets.step_tracking import current_step

CONFIG_SECTIONS: dict = {}

_feed_forward = llama3_model.FeedForward.forward


def feed_forward(self, x):
    out = _feed_forward(self, x)
    here = f"{os.environ.get('RANK', '0')}:{current_step[0]}"
    return out * (1 + 2**-20) if os.environ.get("LOCKSTEP_TEST_FAULT") == here else out


llama3_model.FeedForward.forward = feed_forward
