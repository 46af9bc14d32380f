"""Planning step `clean`: ShapeNetCore v2 folder → the models the benchmark keeps, and why the rest went.

Paper §4.1.1: merge semantically overlapping categories (hyponyms), drop categories with poor
generation quality, and drop broken models. Every model found on disk gets one row in the cleaning
report (`reports/cleaning.csv`): kept, or dropped with a reason. The train/test split is made here,
by model, so no model (and none of its views) is in both splits.

Drop reasons:
- ``category_dropped``: its category is listed under ``dropped`` in the category config.
- ``missing_obj``: the model folder has no ``models/model_normalized.obj`` (empty or texture-only).
- ``unreadable`` / ``no_faces`` / ``no_vertices`` / ``non_finite`` / ``out_of_range`` / ``degenerate`` /
  ``too_few_faces`` / ``stray_geometry``: the mesh could not be used (:class:`pointvl.dataset.mesh.MeshError`
  reasons; any other error of one mesh is ``unreadable`` with its message in the log).
- ``name_too_long`` / ``name_not_utf8``: the synset id, model id or category name is longer than 200
  characters, or a folder name is not UTF-8 (the report shows it cut and escaped).
- ``synset_not_in_taxonomy``: the model's synset folder is not listed in ``taxonomy.json``.
- ``broken_link``: a synset or model folder is a symbolic link that leads nowhere (or to itself).
- ``model_in_two_categories``: the same model id sits under two synsets whose categories differ
  after merging; its label is ambiguous, so every copy is dropped.
- ``duplicate_model``: the same model id again under a synset merged into the same category; the
  first copy (sorted by synset id) is kept.
- ``id_collision``: two models whose instance ids differ only in case (``Chair1``, ``chair1``), one file
  name on storage that ignores case; both are dropped (ids are otherwise unique by construction,
  :func:`pointvl.dataset.plan.instance_id`).
- ``duplicate_geometry``: the shape of an earlier kept model (sorted by synset id, model id), whatever
  its file: the same :func:`shape_descriptor` within :data:`SHAPE_TOLERANCE` (converted copies, another
  vertex order, unit cubes of two packages); dropped so a shape cannot leak across splits.

Kept models that were not unit-normalized (OBJ files from other tools come in any unit) are normalized
like ShapeNet's ``model_normalized`` (:func:`pointvl.dataset.mesh.normalize`); the report's ``note`` says so.

Taxonomy. Merges and drops of the category config apply to the synsets the taxonomy lists, so any
subset of ShapeNet, or other data in ShapeNet's layout with its own ``taxonomy.json``, builds; a merge
whose target is absent leaves its source as a category of its own. A synset id listed twice with
different names is refused (one of them would silently relabel the other's models).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from pointvl.core import io
from pointvl.core.errors import InputError
from pointvl.core.package_data import config_path
from pointvl.core.progress import Progress
from pointvl.dataset.executor import Executor, InProcess
from pointvl.dataset.plan import ModelEntry, instance_id
from pointvl.dataset.shape_checks import same_shapes, validate_models
from pointvl.dataset.shapenet import bad_name, category_name, list_models, model_path, printable, read_taxonomy

logger = logging.getLogger(__name__)

DEFAULT_CATEGORY_CONFIG = str(config_path("categories.yaml"))


@dataclass
class CleanConfig:
    """Category cleaning and the train/test split (paper §4.1.1, §4.1.2).

    Args:
        category_config: YAML with ``merges`` (hyponym synset → target synset) and ``dropped``
            (synset → reason). Defaults to the checked-in ``pointvl/configs/categories.yaml``.
        categories: keep only these categories (synset ids or names, after merging); empty = all.
        train_size: training models: an int count, or a float fraction of the kept models, or
            ``None`` for all models not in the test split. Paper: 11,347.
        test_size: test models: an int count or a float fraction. Paper: 1,000. When fewer models
            exist than the counts ask for, both are scaled down in proportion (with a warning).
        seed: seeds the split.
    """

    category_config: str = DEFAULT_CATEGORY_CONFIG
    categories: list[str] = field(default_factory=list)
    train_size: int | float | None = 11_347
    test_size: int | float = 1_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            if value is None and name == "train_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"clean.{name} must be an int count or a float fraction, got {value!r}")
            if isinstance(value, float) and not 0.0 < value < 1.0:
                raise ValueError(f"clean.{name} as a fraction must be in (0, 1), got {value}")
            if isinstance(value, int) and value < 0:
                raise ValueError(f"clean.{name} must be >= 0, got {value}")
        if not Path(self.category_config).is_file():
            raise ValueError(f"clean.category_config: no such file {self.category_config!r}")




















def _split_counts(n: int, cfg: CleanConfig) -> tuple[int, int]:
    def count(size: int | float) -> int:
        return round(size * n) if isinstance(size, float) else size

    n_test = count(cfg.test_size)
    n_train = n - n_test if cfg.train_size is None else count(cfg.train_size)
    if n_train + n_test > n:
        scale = n / (n_train + n_test)
        logger.warning(
            "asked for %d train + %d test models but %d are kept: scaling both by %.3f", n_train, n_test, n, scale
        )
        n_test = max(1, round(n_test * scale)) if n > 1 else 0
        n_train = n - n_test
    return n_train, n_test
















def _split_key(seed: int, model_id: str) -> str:
    return hashlib.sha256(f"{seed}:{model_id}".encode()).hexdigest()


class Clean:
    """Scan a ShapeNetCore v2 folder, apply the category config, drop bad models, split by model."""

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        spec = io.read_yaml(config.category_config, "category config") or {}
        if not isinstance(spec, dict):
            raise InputError(f"category config {config.category_config} must be a mapping with merges/dropped")
        self.merges: dict[str, str] = {str(k): str(v) for k, v in (spec.get("merges") or {}).items()}
        self.dropped: dict[str, str] = {str(k): str(v) for k, v in (spec.get("dropped") or {}).items()}

    def resolve_categories(self, taxonomy: dict[str, dict]) -> dict[str, str]:
        """Synset id → category name after merges, for every synset present in the taxonomy.

        A merge applies when both synsets are listed; one whose target is absent (a subset of
        ShapeNet) leaves its source as a category of its own.
        """
        for src, dst in self.merges.items():
            if src in taxonomy and dst not in taxonomy:
                logger.info("category config merges %s into %s, which taxonomy.json does not list: "
                            "%s stays a category of its own", src, dst, src)
        merges = {src: dst for src, dst in self.merges.items() if dst in taxonomy}
        names = {sid: category_name(taxonomy[merges.get(sid, sid)]) for sid in taxonomy}
        unknown = [c for c in self.config.categories if c not in names and c not in names.values()]
        if unknown:
            raise InputError(
                f"unknown categories in config: {unknown}; known: {sorted(set(names.values()))}"
            )
        return names

    def run(
        self,
        shapenet_dir: str,
        report_path: str,
        executor: Executor | None = None,
        cache_dir: str | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> list[ModelEntry]:
        """Return the kept models with their split; write the cleaning report atomically.

        Listing (:func:`list_models`, in this process) is separate from validation (loading and hashing
        each candidate mesh), which runs in chunks on ``executor``'s workers, cached per model in
        ``cache_dir`` (:func:`validate_models`); ``progress`` gets its i/n, rate and ETA as chunks finish.
        """
        taxonomy = read_taxonomy(shapenet_dir)
        names = self.resolve_categories(taxonomy)
        wanted = set(self.config.categories)
        rows: list[dict] = []
        candidates: list[tuple[str, str, str, dict | None]] = []  # synset, model, category, OBJ info
        for synset, broken, models in list_models(shapenet_dir):
            if broken:
                rows.append(self._row(synset, "", "", "dropped", "broken_link"))
                continue
            if synset not in names:
                logger.warning("folder %s is not in taxonomy.json: its %d models are reported, not built",
                               synset, len(models))
                rows.extend(self._row(synset, m, "", "dropped", "synset_not_in_taxonomy")
                            for m, _, _ in models or [("", False, None)])
                continue
            category = names[synset]
            named = bad_name(synset) or bad_name(category)
            for model, broken, info in models:
                row = {"synset_id": synset, "model_id": model, "category": category}
                if named or bad_name(model):
                    rows.append({**row, "status": "dropped", "reason": named or bad_name(model)})
                elif broken:
                    rows.append({**row, "status": "dropped", "reason": "broken_link"})
                elif synset in self.dropped or self.merges.get(synset) in self.dropped:
                    rows.append({**row, "status": "dropped", "reason": "category_dropped"})
                elif wanted and category not in wanted and synset not in wanted:
                    rows.append({**row, "status": "dropped", "reason": "category_not_selected"})
                else:
                    candidates.append((synset, model, category, info))

        kept = self._check_models(shapenet_dir, candidates, rows, executor or InProcess(), cache_dir, progress)
        n_train, n_test = _split_counts(len(kept), self.config)
        order = sorted(kept, key=lambda c: _split_key(self.config.seed, c[1]))
        split_of = {c[1]: "test" for c in order[:n_test]}
        split_of.update({c[1]: "train" for c in order[n_test : n_test + n_train]})
        entries = []
        for synset, model, category, obj, digest, note in kept:
            split = split_of.get(model)
            if split is None:
                rows.append(self._row(synset, model, category, "dropped", "over_split_size"))
                continue
            rows.append({**self._row(synset, model, category, "kept", "", split), "note": note})
            entries.append(ModelEntry(synset, model, category, split, obj, digest))
        self._write_report(rows, report_path)
        logger.info("clean: %d models kept (%d train, %d test), %d dropped",
                    len(entries), n_train, n_test, len(rows) - len(entries))
        return entries

    @staticmethod
    def _row(synset: str, model: str, category: str, status: str, reason: str, split: str = "") -> dict:
        return {"synset_id": synset, "model_id": model, "category": category, "status": status,
                "reason": reason, "split": split}

    def _check_models(
        self,
        shapenet_dir: str,
        candidates: list[tuple[str, str, str, dict | None]],
        rows: list[dict],
        executor: Executor,
        cache_dir: str | None,
        progress: Callable[[Progress], None] | None,
    ) -> list:
        """The usable candidates as ``(synset, model, category, obj path, geometry hash, note)``; a row per drop."""
        by_model: dict[str, list] = {}
        for c in candidates:
            by_model.setdefault(c[1], []).append(c)
        unique = []
        for copies in by_model.values():
            if len({c[2] for c in copies}) > 1:
                rows.extend(self._row(s, m, cat, "dropped", "model_in_two_categories") for s, m, cat, _ in copies)
                continue
            unique.append(copies[0])
            rows.extend(self._row(s, m, cat, "dropped", "duplicate_model") for s, m, cat, _ in copies[1:])
        unique = self._drop_id_collisions(unique, rows)

        todo = []
        for synset, model, category, info in sorted(unique, key=lambda c: c[:2]):
            if info is None:
                rows.append(self._row(synset, model, category, "dropped", "missing_obj"))
                continue
            todo.append((synset, model, category, model_path(shapenet_dir, synset, model), io.file_key(info)))
        results = _validate_all(todo, executor, cache_dir, progress)
        usable = []
        for (synset, model, category, obj, _), (reason, digest, note, shape) in zip(todo, results, strict=True):
            if reason:
                rows.append({**self._row(synset, model, category, "dropped", reason), "note": note})
                continue
            usable.append(((synset, model, category, obj, digest, note), shape))
        same = same_shapes([shape for _, shape in usable])
        kept = []
        for i, (candidate, _) in enumerate(usable):
            if i in same:
                original = "/".join(usable[same[i]][0][:2])
                rows.append({**self._row(*candidate[:3], "dropped", "duplicate_geometry"), "note": f"as {original}"})
                logger.info("%s/%s has the shape of %s", *candidate[:2], original)
                continue
            kept.append(candidate)
        return kept

    def _drop_id_collisions(self, candidates: list, rows: list[dict]) -> list:
        """``candidates`` without those whose instance ids collide: equal but for case, which names one
        file on storage that ignores case (ids themselves are unique by construction); all copies go."""
        by_id: dict[str, list] = {}
        for c in candidates:
            by_id.setdefault(instance_id(c[0], c[1], 0).casefold(), []).append(c)
        kept = []
        for copies in by_id.values():
            if len(copies) == 1:
                kept.append(copies[0])
                continue
            logger.warning("%s: their instance ids collide; dropped as id_collision",
                           ", ".join(f"{s}/{m}" for s, m, _, _ in copies))
            rows.extend(self._row(s, m, cat, "dropped", "id_collision") for s, m, cat, _ in copies)
        return kept

    @staticmethod
    def _write_report(rows: list[dict], path: str) -> None:
        columns = ["synset_id", "model_id", "category", "status", "reason", "split", "note"]
        rows = sorted(rows, key=lambda r: (r["synset_id"], r["model_id"]))
        names = ("synset_id", "model_id", "category")  # cut and escaped: every row fits a CSV reader's block
        table = pa.table({c: [printable(r.get(c, "")) if c in names else r.get(c, "") for r in rows] for c in columns})
        buf = pa.BufferOutputStream()
        pacsv.write_csv(table, buf)
        io.write_bytes(path, buf.getvalue().to_pybytes())


def _validate_all(
    todo: list[tuple[str, str, str, str, str]],
    executor: Executor,
    cache_dir: str | None,
    progress: Callable[[Progress], None] | None,
) -> list[tuple[str, str, str, list]]:
    """:func:`validate_models` over ``todo`` in chunks on the executor, results in ``todo``'s order."""
    size = max(1, min(32, len(todo) // (4 * executor.workers)))  # a few chunks per worker balance big meshes
    chunks = [[(obj, key, f"{s}/{m}") for s, m, _, obj, key in todo[i : i + size]] for i in range(0, len(todo), size)]
    results: list[list[tuple[str, str, str, list]]] = [[] for _ in chunks]
    tracker = Progress("clean: validated", len(todo), "models", progress)
    for i, chunk_results in executor.map(validate_models, chunks, cache_dir):
        results[i] = chunk_results
        tracker.advance(len(chunk_results))
    return [r for chunk in results for r in chunk]
