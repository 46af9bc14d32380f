"""Shared fixtures: the mini ShapeNetCore is written once per session (it takes well under 2 s)."""

from __future__ import annotations

import os

import pytest

from pointvl.testing.fixture import FixtureManifest, write_fixture

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def shapenet(tmp_path_factory: pytest.TempPathFactory) -> FixtureManifest:
    """A read-only mini ShapeNetCore v2 (do not write into it)."""
    return write_fixture(str(tmp_path_factory.mktemp("shapenet")), seed=0)
