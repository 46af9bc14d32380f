"""The design docs are in the repository and every reference to them resolves.

Code, configs, tests and the README cite ``docs/design.md#<section>`` and ``docs/facts.md#<section>``; a
section is a heading's anchor as GitHub makes it (lower case, punctuation dropped, spaces to hyphens).
Files outside the repository (a ``DESIGN.md`` or ``FACTS.md`` that a clone does not have) are never cited.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("design.md", "facts.md")
CITING = ("pointvl", "tasks", "flows", "tests", "benchmarks", "docker", "docs")
TOP_FILES = ("README.md", "pyproject.toml", "Makefile", "prefect.yaml")
SUFFIXES = {".py", ".md", ".json", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""}
REFERENCE = re.compile(r"(?:docs/)?(design|facts)\.md#([\w-]+)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading's text."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def citing_files() -> list[Path]:
    files = [ROOT / name for name in TOP_FILES if (ROOT / name).exists()]
    for top in CITING:
        files += [p for p in sorted((ROOT / top).rglob("*")) if p.is_file() and p.suffix in SUFFIXES
                  and "__pycache__" not in p.parts]
    return files


def test_the_docs_exist_with_their_sections():
    for name in DOCS:
        assert (ROOT / "docs" / name).is_file(), name
    assert {"layers", "the-dag", "run-folder", "record", "model-output", "quantization", "grca", "symbols",
            "backends"} <= anchors(ROOT / "docs" / "design.md")


def test_every_reference_to_the_docs_names_an_existing_section():
    known = {name.removesuffix(".md"): anchors(ROOT / "docs" / name) for name in DOCS}
    found, broken = 0, []
    for path in citing_files():
        for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in REFERENCE.finditer(line):
                found += 1
                if m.group(2) not in known[m.group(1)]:
                    broken.append(f"{path.relative_to(ROOT)}:{line_no} {m.group(0)}")
    assert broken == []
    assert found > 20


def test_nothing_cites_design_notes_outside_the_repository():
    stale = re.compile(r"\b(DESIGN|FACTS)(\.md)?\b")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in citing_files() if p.name != "test_docs.py"
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if stale.search(line)]
    assert offenders == []


def test_the_anchor_rule():
    assert anchor("Prefect, FastAPI, SQLAlchemy") == "prefect-fastapi-sqlalchemy"
    assert anchor("The DAG") == "the-dag" and anchor("PyTorch3D and torch") == "pytorch3d-and-torch"
