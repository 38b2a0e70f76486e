"""For audit tests, loaded through job.custom_config_module: every feed-forward call raises torch's
nondeterminism alert as a CUDA scatter-add would (the CPU has no op that raises it)."""

import torch._prims_common

from lockstep.models.llama3 import model as llama3_model

CONFIG_SECTIONS: dict = {}
_forward = llama3_model.FeedForward.forward


def forward(self, x):
    torch._prims_common.alert_not_deterministic("scatter_add_cuda_kernel")
    return _forward(self, x)


llama3_model.FeedForward.forward = forward
