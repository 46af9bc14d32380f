"""The layers of the code, enforced (``docs/design.md#layers``).

Every module of ``pointvl/``, ``tasks/`` and ``flows/`` is parsed with :mod:`ast`; every import in it
(top level, inside functions, under ``if TYPE_CHECKING``; relative imports resolved) is an edge from
its layer to the imported module's layer. An edge may only point down, and two packages of the same
rank (``dataset``, ``evaluation``, ``testing``) never import each other, so no import cycle between
packages can exist; a separate check finds cycles anyway and names their edges, in case the ranks
below are ever loosened.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RANKS = {
    "pointvl": 0,  # the package root: ``__version__`` only
    "core": 1,  # geometry, quantization, the record, the model-output writer, I/O, errors, config loading
    "grca": 2,  # parsing, rewards, advantages, routing, the loss
    "dataset": 3,  # the benchmark build
    "evaluation": 3,  # scoring, reports, reference and endpoint predictors
    "fixture": 3,  # the mini ShapeNet (`pointvl fixture`)
    "testing": 3,  # tiny diffusers pipelines for tests and benchmarks
    "train": 4,  # SFT, GRPO, the model; may use dataset's and evaluation's functions
    "tasks": 5,  # Prefect tasks: thin wrappers over the library
    "flows": 6,  # Prefect flows: compose tasks
    "cli": 7,  # the application: `pointvl build` starts the build flow (imported inside that command)
}
"""Lower ranks are imported by higher ones, never the other way; a package imports within itself freely."""


def layer(module: str) -> str | None:
    """The layer of a dotted module name, or ``None`` for a module outside the project."""
    parts = module.split(".")
    if parts[0] != "pointvl":
        return None
    if len(parts) > 1 and parts[1] in ORCHESTRATION:
        return parts[1]
    if len(parts) > 1 and ((ROOT / "pointvl" / parts[1]).is_dir() or (ROOT / "pointvl" / f"{parts[1]}.py").is_file()):
        return parts[1]
    return "pointvl"  # the root itself, or a name defined in its ``__init__`` (``from pointvl import __version__``)


ORCHESTRATION = ("tasks", "flows")
"""Top-level folders of the repository, installed as ``pointvl.tasks`` and ``pointvl.flows`` (``setup.py``)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = ["pointvl", *parts] if parts[0] in ORCHESTRATION else parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """``(line, imported module)`` of every import in ``source``, at any depth, relative ones resolved.

    ``from a import b`` yields ``a.b`` (``b`` may be a module; an attribute lands in ``a``'s layer all
    the same)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base


def project_modules() -> list[Path]:
    paths = [p for top in ("pointvl", "tasks", "flows") for p in sorted((ROOT / top).rglob("*.py"))]
    assert len(paths) > 80, paths
    return paths


def edges() -> list[tuple[str, str, str]]:
    """``(layer, layer, "path:line module -> module")`` for every import that crosses packages."""
    found = []
    for path in project_modules():
        module = module_name(path)
        for line, target in imports(path.read_text(), module, path.name == "__init__.py"):
            src, dst = layer(module), layer(target)
            if dst is not None and src != dst:
                found.append((src, dst, f"{path.relative_to(ROOT)}:{line} {module} -> {target}"))
    return found


def upward(found: list[tuple[str, str, str]]) -> list[str]:
    return [f"{where} ({src} must not import {dst})" for src, dst, where in found if RANKS[dst] >= RANKS[src]]


def cycles(found: list[tuple[str, str, str]]) -> list[str]:
    """Edges that lie on a cycle between layers (both ends in one strongly connected component)."""
    graph: dict[str, set[str]] = {name: set() for name in RANKS}
    for src, dst, _ in found:
        graph[src].add(dst)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reachable = {name: reach(name) for name in graph}
    return [f"{where} (cycle {src} -> {dst} -> ... -> {src})"
            for src, dst, where in found if src in reachable[dst]]


def test_every_layer_is_known():
    unknown = {layer(module_name(p)) for p in project_modules()} - set(RANKS)
    unknown |= {where for src, dst, where in edges() if dst not in RANKS}
    assert unknown == set()


def test_no_module_imports_a_layer_above_or_beside_its_own():
    assert upward(edges()) == []


def test_no_import_cycle_between_layers():
    assert cycles(edges()) == []


def test_the_parser_sees_every_kind_of_import():
    source = ("import pointvl.core.io, json\n"
              "from .parse import format_output\n"
              "from .. import core\n"
              "from . import spans\n"
              "def f():\n    from pointvl.train.train_config import preflight\n"
              "if TYPE_CHECKING:\n    from pointvl.dataset.plan import Shard\n")
    assert sorted(imports(source, "pointvl.grca.score", False)) == [
        (1, "json"), (1, "pointvl.core.io"), (2, "pointvl.grca.parse.format_output"), (3, "pointvl.core"),
        (4, "pointvl.grca.spans"), (6, "pointvl.train.train_config.preflight"), (8, "pointvl.dataset.plan.Shard")]
    assert list(imports("from . import x\n", "pointvl.grca", True)) == [(1, "pointvl.grca.x")]
    assert layer("pointvl") == "pointvl" and layer("pointvl.grca.parse") == "grca"
    assert layer("pointvl.flows.build") == "flows" and layer("pointvl.tasks.stage_tasks") == "tasks"
    assert layer("pointvl.__version__") == "pointvl" and layer("pointvl.dataset") == "dataset"
    assert layer("numpy") is None and layer("pointvlx") is None


def test_an_upward_import_and_a_cycle_are_named_by_their_edge():
    found = [("core", "grca", "pointvl/core/record.py:26 pointvl.core.record -> pointvl.grca.parse.format_output"),
             ("grca", "core", "pointvl/grca/parse.py:46 pointvl.grca.parse -> pointvl.core.spatial.QuantConfig"),
             ("dataset", "evaluation", "pointvl/dataset/x.py:3 pointvl.dataset.x -> pointvl.evaluation.y")]
    assert upward(found) == [
        "pointvl/core/record.py:26 pointvl.core.record -> pointvl.grca.parse.format_output (core must not import grca)",
        "pointvl/dataset/x.py:3 pointvl.dataset.x -> pointvl.evaluation.y (dataset must not import evaluation)"]
    assert cycles(found) == [
        "pointvl/core/record.py:26 pointvl.core.record -> pointvl.grca.parse.format_output (cycle core -> grca -> ... "
        "-> core)",
        "pointvl/grca/parse.py:46 pointvl.grca.parse -> pointvl.core.spatial.QuantConfig (cycle grca -> core -> ... "
        "-> grca)"]
