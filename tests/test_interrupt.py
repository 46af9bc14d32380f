"""Signals: Ctrl-C or SIGTERM ends a build in seconds with one line; a SIGKILLed build leaves no process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

KILLED_BUILD = """
import subprocess, sys, time
from pointvl.cli.interrupt import start_reaper
from pointvl.dataset.executor import ProcessPool
pool = ProcessPool(1)
pool.submit(int).result()  # the worker is up
server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # as the embedded server
start_reaper()
print("up", flush=True)
time.sleep(600)
"""


def _gone_within(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return alive


def test_a_sigkilled_build_leaves_no_worker_tracker_or_server_alive():
    build = subprocess.Popen([sys.executable, "-c", KILLED_BUILD], stdout=subprocess.PIPE, text=True)
    try:
        assert build.stdout.readline().strip() == "up"
        time.sleep(1.0)  # the reaper has seen the children
        children = [c for c in psutil.Process(build.pid).children(recursive=True)
                    if "pointvl.cli.interrupt" not in " ".join(c.cmdline())]
        assert len(children) >= 3  # the worker, the resource tracker or queue feeder, the "server"
        os.kill(build.pid, signal.SIGKILL)
        build.wait(timeout=10)
        assert not _gone_within(children, 15.0)
    finally:
        build.kill()


def test_ctrl_c_or_sigterm_to_the_group_ends_a_build_in_seconds_with_one_line(shapenet, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("shard_size: 8\nclean: {test_size: 0.25, train_size: null}\nrender: {width: 64, height: 64}\n")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        out = tmp_path / f"run-{sig.name}"
        build = subprocess.Popen([sys.executable, "-m", "pointvl.cli", "build", "--shapenet", shapenet.root, "--out",
                                  str(out), "--config", str(config)], stderr=subprocess.PIPE, text=True, env=env,
                                 start_new_session=True)
        deadline = time.monotonic() + 300
        while not (out / "stages").exists() and time.monotonic() < deadline and build.poll() is None:
            time.sleep(0.2)  # the build is under way: its stages have started
        assert build.poll() is None, build.stderr.read()[-2000:]
        children = psutil.Process(build.pid).children(recursive=True)
        start = time.monotonic()
        os.killpg(build.pid, sig)
        _, err = build.communicate(timeout=60)
        took = time.monotonic() - start
        lines = [ln for ln in err.splitlines() if ln.startswith("pointvl build:")]
        assert build.returncode == code and took < 15, (took, err[-2000:])
        assert len(lines) == 1 and "interrupted" in lines[0] and "re-run the same command" in lines[0], err[-2000:]
        assert "ConnectError" not in err and "Traceback" not in err
        assert not _gone_within(children, 15.0)
