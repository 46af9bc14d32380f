"""Shared fixtures: the mini ShapeNetCore is written once per session (it takes well under 2 s)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

from pointvl.testing.fixture import FixtureManifest, write_fixture

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The embedded server gives up after 20 s by default (prefect/server/api/server.py SubprocessASGIServer.start):
# too short on a loaded 2-core CI machine, where its start alone takes ~11 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Each test session (each pytest-xdist worker) has a Prefect home of its own, before anything imports
# Prefect: two embedded servers never share one SQLite database, and ~/.prefect is left alone.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="pointvl-tests-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def shapenet(tmp_path_factory: pytest.TempPathFactory) -> FixtureManifest:
    """A read-only mini ShapeNetCore v2 (do not write into it)."""
    return write_fixture(str(tmp_path_factory.mktemp("shapenet")), seed=0)
