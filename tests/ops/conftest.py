"""A real ``prefect server start`` on loopback for the operations tests (one per session and database).

``prefect_server`` keeps its database in SQLite (the quick default); ``prefect_server_postgres`` runs on a
PostgreSQL cluster the fixture creates (Debian's ``postgresql`` package: ``initdb``/``pg_ctl`` on a temporary
folder and a loopback port), as the README's production section sets a server up.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from ports import free_port as _free_port

PREFECT = str(Path(sys.executable).parent / "prefect")


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a free loopback port."""
    return _free_port


def _start_server(home: Path, database: dict[str, str]) -> Iterator[dict]:
    port = _free_port()
    env = {
        **os.environ,
        **database,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # The deployment concurrency lease's first window at its minimum (30 s instead of 300 s), so a
        # test that waits past it stays short.
        "PREFECT_SERVER_CONCURRENCY_INITIAL_DEPLOYMENT_LEASE_DURATION": "30",
    }
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = open(home / "server.log", "ab")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = {"api": env["PREFECT_API_URL"], "ui": f"http://127.0.0.1:{port}", "env": env, "prefect": PREFECT,
              "log": home / "server.log", "database": "postgresql" if database else "sqlite", "command": command}
    try:
        _wait_healthy(server, proc)
        server["proc"] = proc
        yield server
    finally:
        _stop(server.get("proc", proc))
        log.close()


def _wait_healthy(server: dict, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{server['api']}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"prefect server did not start: {server['log'].read_text()[-2000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _restart(server: dict, down_s: float = 0) -> None:
    _stop(server["proc"])
    time.sleep(down_s)
    log = open(server["log"], "ab")  # noqa: SIM115 (the child holds it; closed here right after)
    server["proc"] = subprocess.Popen(server["command"], env=server["env"], stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
    log.close()
    _wait_healthy(server, server["proc"])


@pytest.fixture
def restart_server() -> Callable[[dict, float], None]:
    """``restart_server(server, down_s)``: stop a server fixture's server, leave it down ``down_s`` seconds, start it
    again on the same port and database."""
    return _restart


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``{"api", "ui", "env" (for subprocesses), "prefect" (the CLI), "log", "database"}``; SQLite database."""
    yield from _start_server(tmp_path_factory.mktemp("prefect_home"), {})


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: Debian keeps them off PATH, in /usr/lib/postgresql/VERSION/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster on a temporary folder and a loopback port; yields its SQLAlchemy URL for Prefect.

    PostgreSQL refuses to run as root, so as root its programs run as the ``postgres`` user the Debian package
    creates (``runuser -u postgres --``), on a folder that user owns."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl): `make setup` installs Debian's postgresql")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="pointvl-pg-"))  # not under pytest's 0700 root-owned tmp tree
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL refuses to run as root and there is no `postgres` user to run it as")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port, password = _free_port(), "pointvl-test"
    (data / "pw").write_text(password)
    os.chmod(data / "pw", 0o644)

    def pg(*args: str) -> None:
        result = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PGPASSWORD": password})
        assert result.returncode == 0, f"{' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"

    pg(str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "prefect", f"--pwfile={data / 'pw'}",
       "--auth=scram-sha-256", "-E", "UTF8")
    try:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "postgres.log"), "-w", "start",
           "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {data}")
        pg(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
        yield f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{port}/prefect"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server_postgres(tmp_path_factory: pytest.TempPathFactory, postgres: str) -> Iterator[dict]:
    """As ``prefect_server``, its database in PostgreSQL (``PREFECT_SERVER_DATABASE_CONNECTION_URL``)."""
    yield from _start_server(tmp_path_factory.mktemp("prefect_home_pg"),
                             {"PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres})
