"""The fast subset of the hostile suite (issue 25): each catalogue case keeps the harness contract (one
line and exit 2 when refused, no traceback, nothing outside its folder changed, no process left), and a
few hypothesis examples per property do too. benchmarks/hostile.py runs every case and more examples."""

import shutil

import pytest

from tests.hostile.cases import FAST
from tests.hostile.harness import run_case
from tests.hostile.properties import JSON_PROPERTIES, explore_json, explore_options

EXAMPLES = 6
"""Hypothesis examples per property here (the benchmark runs many more)."""


@pytest.mark.parametrize("case", FAST, ids=[case.id for case in FAST])
def test_case(case, hostile_fixtures, tmp_path):
    verdict = run_case(case, hostile_fixtures, tmp_path / "case")
    assert verdict.passed, verdict.describe()
    shutil.rmtree(tmp_path / "case", ignore_errors=True)  # a copied run is megabytes; keep only failures


@pytest.mark.parametrize("prop", JSON_PROPERTIES, ids=[prop.name for prop in JSON_PROPERTIES])
def test_json_property(prop, hostile_fixtures, tmp_path):
    failed = [v for v in explore_json(prop, hostile_fixtures, tmp_path, examples=EXAMPLES) if not v.passed]
    assert not failed, "\n\n".join(v.describe() for v in failed)


def test_option_property(hostile_fixtures, tmp_path):
    failed = [v for v in explore_options(hostile_fixtures, tmp_path, examples=EXAMPLES * 3) if not v.passed]
    assert not failed, "\n\n".join(v.describe() for v in failed)
