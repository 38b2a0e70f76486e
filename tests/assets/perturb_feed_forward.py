"""A deliberate numerics change for bisect tests, loaded through job.custom_config_module: from step
PERTURB_FROM_STEP on, every feed-forward output is scaled by (1 + 2^-20)."""

from lockstep.models.llama3 import model as llama3_model
from tests.assets.step_tracking import current_step

PERTURB_FROM_STEP = 3
CONFIG_SECTIONS: dict = {}

_feed_forward = llama3_model.FeedForward.forward


def feed_forward(self, x):
    out = _feed_forward(self, x)
    return out * (1 + 2**-20) if current_step[0] >= PERTURB_FROM_STEP else out


llama3_model.FeedForward.forward = feed_forward
