"""A deliberate numerics change for bisect tests, loaded through job.custom_config_module: from step
PERTURB_FROM_STEP on, every feed-forward output is scaled by (1 + 2^-20)."""

from lockstep.models.llama3 import model as llama3_model
from lockstep.train import trainer as trainer_module

PERTURB_FROM_STEP = 3
CONFIG_SECTIONS: dict = {}
_current_step = [0]

_train_step = trainer_module.Trainer.train_step
_feed_forward = llama3_model.FeedForward.forward


def train_step(self, *args, **kwargs):
    _current_step[0] = self.state.step + 1
    return _train_step(self, *args, **kwargs)


def feed_forward(self, x):
    out = _feed_forward(self, x)
    return out * (1 + 2**-20) if _current_step[0] >= PERTURB_FROM_STEP else out


trainer_module.Trainer.train_step = train_step
llama3_model.FeedForward.forward = feed_forward
