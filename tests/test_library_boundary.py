"""`pointvl/` is a library usable without Prefect: importing any of its modules never imports Prefect.

The CLI (`pointvl.cli`, `pointvl.cli_ops`) and `pointvl.bench` are the application around it: their
commands start flows, and import Prefect inside those commands only.
"""

import subprocess
import sys

SCRIPT = """
import importlib, pkgutil, sys
import pointvl
names = [m.name for m in pkgutil.walk_packages(pointvl.__path__, "pointvl.")]
for name in names:
    importlib.import_module(name)
assert len(names) > 30, names
print("prefect" in sys.modules or any(m.startswith("prefect.") for m in sys.modules))
"""


def test_importing_the_library_does_not_import_prefect():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
