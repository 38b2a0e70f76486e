"""Guard against unintended numerics changes: 20 steps of each debug preset (llama3, qwen3, qwen3_moe, llama4)
must equal the stored reference losses, grad norms and fingerprints bitwise. If a change is intended,
regenerate (see the command in tests/assets/losses/regenerate.py) and say why in the commit."""

import pytest

from lockstep.tools.compare import compare_series, first_difference, load_series
from tests.assets.losses.regenerate import REFERENCE, REFERENCES, run


def test_llama3_debug_matches_the_reference_losses_bitwise(tmp_path):
    rows = compare_series([load_series(REFERENCE), load_series(run(tmp_path))])
    assert len(rows) == 20
    assert first_difference(rows) is None, "numerics changed; see tests/assets/losses/regenerate.py"


@pytest.mark.parametrize("config", [c for c in REFERENCES if c != "llama3_debug"])
def test_other_debug_presets_match_their_reference_losses_bitwise(tmp_path, config):
    rows = compare_series([load_series(REFERENCES[config]), load_series(run(tmp_path, config))])
    assert len(rows) == 20
    assert first_difference(rows) is None, "numerics changed; see tests/assets/losses/regenerate.py"
