"""Shared fixtures. The built-in corpus and tokenizer are built once per session into a temp cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def lockstep_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("lockstep-cache")
    os.environ["LOCKSTEP_CACHE"] = str(cache)
    return cache


@pytest.fixture
def shared_tokenizer() -> Path:
    path = SHARED_DATA / "tokenizer-2k" / "tokenizer.json"
    if not path.exists():
        pytest.skip("../shared/data/tokenizer-2k is not beside this checkout")
    return path
