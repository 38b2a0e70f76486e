"""A run with checkpoints at steps 4 and 8, trained once per session; each test that tampers with
checkpoints works on its own copy."""

import shutil

import pytest

from tests.checkpoint.helpers import EIGHT, train


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    train(folder, EIGHT)
    return folder


@pytest.fixture
def run(tmp_path, trained):
    """A private copy of the trained run folder under tmp_path."""
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path
