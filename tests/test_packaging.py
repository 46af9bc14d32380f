"""The project as a user installs it: a wheel (``pip install .``, not editable) that works outside the checkout.

The wheel is built offline from a copy of what it ships (``pyproject.toml``, ``README.md``, ``pointvl/``,
``flows/``, ``tasks/``) and installed without dependencies into a new venv that reuses this
environment's installed packages (a ``.pth`` line). Its ``pointvl`` then writes the fixture, builds
it with embedded Prefect and evaluates predictions, from a folder outside the checkout.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("pointvl",)
SHIPPED = ("pointvl", "flows", "tasks", "prompts", "schemas")  # the folders the wheel is built from
# The modules the commands fixture, build (the flow and its tasks) and evaluate import.
BUILD_PATH = ("pointvl.cli", "pointvl.dataset.runner", "pointvl.evaluation.scoring", "pointvl.fixture",
              "pointvl.flows.build", "pointvl.flows.gpu_stages", "pointvl.flows.annotate_shard")
CONFIG = """
shard_size: 64
clean: {test_size: 0.25, train_size: null, categories: [chair, mug]}
sample_points: {num_points: 256}
render: {width: 48, height: 48}
refine: {backend: passthrough}
synthesize: {backend: passthrough}
"""

PREDICT_GROUND_TRUTH = """
import json
from pointvl.core.spatial import QuantConfig
from pointvl.core.record import iter_records, target_text
with open("preds.jsonl", "w") as f:
    for r in iter_records("run/shards", "test"):
        f.write(json.dumps({"instance_id": r["instance_id"], "output": target_text(r, QuantConfig())}) + "\\n")
"""


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def _declared() -> tuple[set[str], set[str]]:
    """(core dependencies, dependencies of any extra) of pyproject.toml, as normalised names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    return {_name(r) for r in project["dependencies"]}, extras - {"pointvl"}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(top-level package, at module level)`` of every absolute import of a module."""
    tree = ast.parse(path.read_text())
    module_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(n.split(".")[0], id(node) in module_level) for n in names]
    return out


def test_every_import_on_the_build_path_is_declared():
    """Module-level imports of the build path's modules are core dependencies; imports inside functions
    are core or an extra's (and go through :func:`pointvl.core.extras.require` when optional)."""
    script = (f"import importlib, sys\nfor m in {BUILD_PATH!r}: importlib.import_module(m)\n"
              "print('\\n'.join(sorted(f'{n}={m.__file__}' for n, m in list(sys.modules.items()) if n.split('.')[0] in "
              f"{FIRST_PARTY!r} and getattr(m, '__file__', None))))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    files = dict(line.split("=", 1) for line in result.stdout.split())
    modules = sorted(files)
    assert "pointvl.dataset.stages.write_shards" in modules and "pointvl.tasks.stage_tasks" in modules
    core, extras = _declared()
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for module in modules:
        path = Path(files[module])  # where the import found it (pointvl.flows: the repository's flows/)
        for top, module_level in _imports(path):
            if top in sys.stdlib_module_names or top in FIRST_PARTY or top == "__future__":
                continue
            names = {_name(d) for d in distributions.get(top, [top])}
            allowed = core if module_level else core | extras
            if not names & allowed:
                undeclared.append(f"{module} imports {top} ({'module level' if module_level else 'lazily'})")
    assert undeclared == []


def test_a_missing_extra_names_it_in_one_line():
    from pointvl.core.errors import InputError
    from pointvl.core.extras import MissingExtra, require

    assert require("json", extra="annotate", purpose="x").dumps({}) == "{}"
    with pytest.raises(MissingExtra) as err:
        require("pointvl_no_such_module", extra="gpu", purpose="the diffusers backend")
    assert str(err.value) == "the diffusers backend needs pointvl_no_such_module: pip install 'pointvl[gpu]'"
    assert isinstance(err.value, ImportError) and isinstance(err.value, InputError)  # the CLI's one-line errors


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_the_wheel_installs_and_builds_outside_the_checkout(tmp_path):
    # 1. a wheel from a copy of the shipped files (an in-tree build would write build/ into the checkout)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in SHIPPED:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PREFECT_API_URL")}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp_path / "dist"), str(src)], tmp_path, env)
    [wheel] = (tmp_path / "dist").glob("pointvl-*.whl")

    # 2. a new venv seeing this environment's packages, the wheel installed into it without dependencies
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).stdout.strip())
    shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "shared_env.pth").write_text("".join(f"{p}\n" for p in sorted(shared)))
    # --ignore-installed: never touch this environment's own pointvl
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
         tmp_path, env)

    # 3. from a folder outside the checkout, every package and data file comes from the wheel
    work = tmp_path / "work"
    work.mkdir()
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    where = _run([str(python), "-c", "import pointvl, pointvl.flows as f, pointvl.tasks as t, "
                  "pointvl.core.package_data as d; print(pointvl.__file__, f.__file__, t.__file__, d.prompts_root(),"
                  " d.schema_path('record.schema.json'))"],
                 work, env).stdout.split()
    assert all(p.startswith(str(site)) for p in where), where
    # nothing but pointvl at the top of site-packages (no generic `flows` or `tasks` to collide with)
    [dist_info] = site.glob("pointvl-*.dist-info")
    top = {line.split("/")[0] for line in (dist_info / "RECORD").read_text().splitlines()}
    assert {t for t in top if t != dist_info.name and not t.startswith("..")} == {"pointvl"}, top  # "..": scripts
    assert (dist_info / "top_level.txt").read_text().split() == ["pointvl"]
    pointvl = str(target / "bin" / "pointvl")
    _run([pointvl, "fixture", "shapenet"], work, env)
    (work / "tiny.yaml").write_text(CONFIG)
    build = _run([pointvl, "build", "--shapenet", "shapenet", "--out", "run", "--config", "tiny.yaml"], work, env)
    assert "records:" in build.stdout
    shards = sorted(p.name for p in (work / "run" / "shards").glob("*.parquet"))
    assert shards == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]

    # 4. evaluate the ground truth itself: every field scores (near) 1
    _run([str(python), "-c", PREDICT_GROUND_TRUTH], work, env)
    _run([pointvl, "evaluate", "--shards", "run/shards", "--predictions", "preds.jsonl", "--out", "metrics.json"],
         work, env)
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["n"] > 0 and metrics["n_missing"] == 0 and metrics["n_unparsable"] == 0
    assert metrics["iou2d"] > 0.95 and metrics["iou3d"] > 0.95 and metrics["qa_accuracy"] == 1.0
