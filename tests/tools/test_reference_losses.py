"""Guard against unintended numerics changes: 20 steps of llama3_debug must equal the stored reference
losses, grad norms and fingerprints bitwise. If a change is intended, regenerate (see the command in
tests/assets/losses/regenerate.py) and say why in the commit."""

from lockstep.tools.compare import compare_series, first_difference, load_series
from tests.assets.losses.regenerate import REFERENCE, run


def test_llama3_debug_matches_the_reference_losses_bitwise(tmp_path):
    rows = compare_series([load_series(REFERENCE), load_series(run(tmp_path))])
    assert len(rows) == 20
    assert first_difference(rows) is None, "numerics changed; see tests/assets/losses/regenerate.py"
