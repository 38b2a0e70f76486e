"""lockstep audit lists nondeterministic ops and layout-dependent features."""

import os
import subprocess
import sys

from lockstep.config import load_config
from lockstep.tools.audit import config_findings
from tests.helpers import tiny_overrides

LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")


def _audit(tmp_path, *extra):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [LOCKSTEP, "audit", "--config", "llama3_debug", "--steps", "2", *tiny_overrides(tmp_path), *extra]
    env = os.environ | {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_audit_lists_a_nondeterministic_op(tmp_path):
    done = _audit(tmp_path, "--job.custom_config_module", "tests.assets.nondeterministic_op")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "torch | scatter_add_cuda_kernel | nondeterministic" in done.stdout


def test_audit_of_a_clean_config_passes(tmp_path):
    done = _audit(tmp_path, "--debug.deterministic")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "nothing found" in done.stdout


def test_layout_dependent_features_are_named():
    config = load_config(
        "llama3_debug", ["--optimizer.implementation", "fused", "--debug.no-layout-invariant-reductions"]
    )
    findings = config_findings(
        config.debug, config.parallelism, config.optimizer, config.training, config.compile, config.model
    )
    items = {f.item: f.verdict for f in findings}
    assert items["optimizer.implementation = fused"] == "layout-dependent"
    assert items["debug.layout_invariant_reductions = false"] == "layout-dependent"
    assert items["debug.deterministic = false"] == "nondeterministic"
