"""The hostile fixtures, built once per session (after the root conftest points LOCKSTEP_CACHE at the
session's cache)."""

import pytest

from tests.hostile.fixtures import Fixtures, build_fixtures


@pytest.fixture(scope="session")
def hostile_fixtures(tmp_path_factory, lockstep_cache) -> Fixtures:
    return build_fixtures(tmp_path_factory.mktemp("hostile-fixtures"))
