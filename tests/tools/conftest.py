"""Fixtures shared by tests/tools files."""

import pytest

from tests.tools.spiky import WINDOW, _train, _write_corpus


@pytest.fixture(scope="module")
def spiky(tmp_path_factory):
    """(run folder, corpus, metrics) of the run with spike detection (log)."""
    root = tmp_path_factory.mktemp("spiky")
    _write_corpus(root / "corpus.jsonl")
    metrics = _train(root / "run", root / "corpus.jsonl", "--debug.spike_window", str(WINDOW))
    return root / "run", root / "corpus.jsonl", metrics
