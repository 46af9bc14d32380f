"""`pointvl/` is a library usable without Prefect: no module of it imports Prefect, ``pointvl.flows`` or
``pointvl.tasks`` (the orchestration, installed from the repository's ``flows/`` and ``tasks/``).

The CLI entry modules (`pointvl.cli`, `pointvl.cli.operations`) are the application around it: their
commands start flows, and import Prefect inside those commands only. Benchmarks live outside the
package (``benchmarks/``).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pointvl

LIBRARY = Path(pointvl.__file__).parent
CLI_ENTRY = {"cli/__init__.py", "cli/operations.py"}
FORBIDDEN = ("prefect", "pointvl.flows", "pointvl.tasks")

SCRIPT = """
import importlib, pkgutil, sys
import pointvl
names = [m.name for m in pkgutil.walk_packages(pointvl.__path__, "pointvl.")]
for name in names:
    importlib.import_module(name)
assert len(names) > 30, names
print("prefect" in sys.modules or any(m.startswith("prefect.") for m in sys.modules))
"""


def orchestrator_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a forbidden top-level package, at any depth of the code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n) for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]
    return found


def test_no_library_module_imports_the_orchestrator_even_lazily():
    modules = sorted(p for p in LIBRARY.rglob("*.py") if p.relative_to(LIBRARY).as_posix() not in CLI_ENTRY)
    assert len(modules) > 30
    offenders = [f"{p.relative_to(LIBRARY.parent)}:{line} imports {name}"
                 for p in modules for line, name in orchestrator_imports(p.read_text())]
    assert offenders == []


def test_the_static_check_sees_imports_inside_functions():
    source = ("def f():\n    from pointvl.flows.build import x\n    import prefect.flows, json\n\n"
              "import pointvl.tasks.stage_tasks\n")
    assert sorted(orchestrator_imports(source)) == [(2, "pointvl.flows.build"), (3, "prefect.flows"),
                                                    (5, "pointvl.tasks.stage_tasks")]
    assert orchestrator_imports("from . import tasks\nimport pointvl.flowsx\nimport flows\n") == []


def test_importing_the_library_does_not_import_prefect():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_a_cpu_worker_loads_no_model_library():
    """A CPU stage worker (the imports of ``executor._warm``) loads neither torch nor diffusers nor
    transformers: each would cost every worker process hundreds of MB and its start-up a second, for
    stages that use none of them."""
    code = ("import sys; from pointvl.dataset.executor import _warm; _warm(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
