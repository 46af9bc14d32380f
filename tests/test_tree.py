"""The repository's tree: nothing a common ignore template would hide."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = Path(__file__).parent / "data" / "Python.gitignore"


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_no_tracked_file_is_hidden_by_githubs_python_gitignore(tmp_path):
    """A contributor who adds GitHub's Python.gitignore (which ignores ``build/``, ``lib/``, ``env/`` ... at
    any depth) to the project's own rules must not lose a file: ``git check-ignore`` on every tracked path."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    own = (ROOT / ".gitignore").read_text() if (ROOT / ".gitignore").exists() else ""
    (tmp_path / ".gitignore").write_text(own + "\n" + TEMPLATE.read_text())
    paths = _tracked()
    assert len(paths) > 100
    out = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=tmp_path, input="\n".join(paths),
                         capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr  # 1: nothing matched
    assert out.stdout.split() == []


def test_the_template_catches_what_it_should(tmp_path):
    """The check above can fail: the template hides the old package folder ``pointvl/build/``."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text(TEMPLATE.read_text())
    out = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=tmp_path,
                         input="pointvl/build/dag.py\npointvl/dataset/dag.py\n", capture_output=True, text=True)
    assert out.stdout.split() == ["pointvl/build/dag.py"]


def test_no_two_modules_share_a_file_name():
    """A name says which module it is: ``review.py`` in three folders (stage, task, flow) made readers open the
    wrong one. Tests mirror the package and are left out."""
    names: dict[str, list[str]] = {}
    for top in ("pointvl", "flows", "tasks", "prompts", "schemas", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name != "__init__.py":
                names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert len(names) > 80
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}


def test_flows_hold_only_flows():
    """``flows/`` reads as the DAG: each module there defines a Prefect flow (helpers live in ``tasks/``)."""
    for path in sorted((ROOT / "flows").glob("*.py")):
        if path.name != "__init__.py":
            assert "@flow(" in path.read_text(), f"{path.relative_to(ROOT)} defines no flow: move it to tasks/"
