"""lockstep.tools.estimate.preflight: the trainer's start-up check refuses a layout that clearly cannot fit
the device, in one line, naming a layout that fits."""

from __future__ import annotations

import pytest

from lockstep.config import load_config
from lockstep.config.errors import ConfigError
from lockstep.tools.estimate import device_spec
from lockstep.tools.estimate.preflight import refuse_layouts_that_cannot_fit


def test_preflight_refuses_in_one_line_with_a_layout_that_fits():
    config = load_config("llama3_debug", [])
    tiny = device_spec("cpu", memory_gib=0.25)
    with pytest.raises(ConfigError) as refused:
        refuse_layouts_that_cannot_fit(config, 1, tiny)
    message = str(refused.value)
    assert "\n" not in message and "the biggest term is" in message and "a layout that fits: --" in message
    refuse_layouts_that_cannot_fit(config, 1, device_spec("cpu", memory_gib=64.0))  # fits: no error
    interleaved = load_config("llama3_debug", ["--parallelism.pipeline_parallel_degree", "2",
                                               "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B"])  # fmt: skip
    refuse_layouts_that_cannot_fit(interleaved, 2, tiny)  # not estimated yet: left to the run
