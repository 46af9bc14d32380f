"""The shard plan of a build: fixed once written, so a resumed run processes the same units.

Work is planned in shards of models (all views of a model stay in one shard). A shard holds one
split only; shard ``i`` of split ``s`` becomes the final file ``{s}-{i:05d}-of-{n:05d}.parquet``.
An incremental build (:func:`extend_plan`) changes a plan only by updating shards' model lists and
appending shards, so every finished shard keeps its index.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from pointvl.core import io
from pointvl.core.errors import InputError
from pointvl.dataset.run_folder import RunFolder

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ModelEntry:
    """One kept model (cleaning's result, the plan's unit). ``geometry`` is its
    :func:`pointvl.dataset.shape_checks.geometry_hash`, so an incremental build sees a changed mesh under the
    same id (empty in plans written before it was recorded)."""

    synset_id: str
    model_id: str
    category: str
    split: str
    obj_path: str
    geometry: str = ""


@dataclass(frozen=True)
class Shard:
    index: int  # work shard index over the whole run
    split: str
    split_index: int
    split_count: int
    models: tuple[ModelEntry, ...]
    views_per_model: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    @property
    def final_name(self) -> str:
        return f"{self.split}-{self.split_index:05d}-of-{self.split_count:05d}.parquet"

    def instance_ids(self) -> list[str]:
        return [instance_id(m.synset_id, m.model_id, v) for m in self.models for v in range(self.views_per_model)]


@dataclass(frozen=True)
class Plan:
    shards: tuple[Shard, ...]
    fingerprint: str = field(default="")

    def categories(self) -> list[str]:
        """The benchmark's categories: those of every planned model, sorted."""
        return sorted({m.category for s in self.shards for m in s.models})

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        shards = tuple(
            Shard(**{**s, "models": tuple(ModelEntry(**m) for m in s["models"])}) for s in data["shards"]
        )
        return cls(shards=shards, fingerprint=data["fingerprint"])


class PlanMismatchError(InputError):
    """The run folder holds a plan made from other input or config."""


def instance_id(synset_id: str, model_id: str, view_index: int) -> str:
    """``{synset_id}-{model_id}-{view_index}``, with ``%`` and ``-`` of the synset id written ``%25`` and
    ``%2D``: the synset part holds no ``-``, so two models never share an id (``chairs`` + ``old-1`` and
    ``chairs-old`` + ``1`` would both be ``chairs-old-1-0``). ShapeNet's 8-digit synset ids are unchanged."""
    return f"{synset_id.replace('%', '%25').replace('-', '%2D')}-{model_id}-{view_index}"


def make_plan(models: list[ModelEntry], shard_size: int, views_per_model: int, fingerprint: str) -> Plan:
    """Chunk each split's models (in their given order) into shards of ``shard_size`` instances."""
    return extend_plan(Plan(()), models, shard_size, views_per_model, fingerprint)


def extend_plan(
    old: Plan, models: list[ModelEntry], shard_size: int, views_per_model: int, fingerprint: str
) -> Plan:
    """``old`` brought up to date with ``models`` (the current cleaning result) without moving finished work.

    A planned model still kept in the same split stays in its shard, as its current entry (so a changed
    mesh changes the shard's model list); a model dropped, removed or moved to the other split leaves
    its shard, which keeps its index (possibly empty). Models not planned yet are chunked, per split in
    their given order, into new shards after the existing ones. Only ``split_count`` (the ``-of-{n}``
    of final names) changes for existing shards.
    """
    current = {(m.synset_id, m.model_id): m for m in models}
    layout: list[tuple[str, int, tuple[ModelEntry, ...]]] = []  # split, split index, models
    for shard in old.shards:
        ids = [(m.synset_id, m.model_id) for m in shard.models]
        still = tuple(current[k] for k in ids if k in current and current[k].split == shard.split)
        layout.append((shard.split, shard.split_index, still))
    placed = {(m.synset_id, m.model_id) for _, _, ms in layout for m in ms}
    models_per_shard = max(1, shard_size // views_per_model)
    for split in SPLITS:
        new = [m for m in models if m.split == split and (m.synset_id, m.model_id) not in placed]
        first = sum(s == split for s, _, _ in layout)
        for j in range(0, len(new), models_per_shard):
            layout.append((split, first + j // models_per_shard, tuple(new[j : j + models_per_shard])))
    counts = Counter(split for split, _, _ in layout)
    shards = tuple(
        Shard(i, split, j, counts[split], ms, views_per_model) for i, (split, j, ms) in enumerate(layout)
    )
    return Plan(shards, fingerprint)


class DamagedPlanError(InputError):
    """``plan.json`` exists but cannot be read as a plan."""


_loaded: dict[str, tuple[str, Plan]] = {}


def load_plan(run_dir: str) -> Plan:
    """The run's plan; a damaged ``plan.json`` raises :class:`DamagedPlanError` saying what to do.

    Parsed once per process and version of the file (its size and mtime or ETag): every stage of every
    shard asks for it, and a plan of 52k models is ~20 MB of JSON.
    """
    path = RunFolder.of(run_dir).plan
    fs, p = io.filesystem(path)
    stamp = io.file_key(fs.info(p))  # FileNotFoundError: no plan yet
    if path in _loaded and _loaded[path][0] == stamp:
        return _loaded[path][1]
    try:
        plan = Plan.from_json(io.read_json(path))
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # bad bytes, bad JSON, wrong shape
        raise DamagedPlanError(
            f"{path} is damaged ({type(err).__name__}: {str(err)[:120]}): move it away and re-run the same "
            "build; the plan is made again from the same input and config, and finished outputs that "
            "still match it are kept"
        ) from None
    _loaded[path] = (stamp, plan)
    return plan


def existing_plan(run_dir: str, fingerprint: str) -> Plan | None:
    """The run's plan, or ``None`` for a new run folder; a plan of another fingerprint is refused.

    Checked before cleaning, so a refused run keeps its cleaning report as its plan was made.
    """
    if not io.exists(RunFolder.of(run_dir).plan):
        return None
    existing = load_plan(run_dir)
    if existing.fingerprint != fingerprint:
        raise PlanMismatchError(
            f"{run_dir} was built from another input or config (plan fingerprint "
            f"{existing.fingerprint[:12]} != {fingerprint[:12]}); use a new --out folder, "
            "the original input and config to resume, or an incremental build"
        )
    return existing


def save_or_check_plan(run_dir: str, plan: Plan) -> Plan:
    """Write ``plan`` unless the run already has one; an existing plan must have the same fingerprint.

    Re-planning a half-written run would shuffle instances between shard files, so a run folder
    keeps the plan it started with; a changed input or config needs a new output folder (or an
    incremental build, which extends the plan instead).
    """
    existing = existing_plan(run_dir, plan.fingerprint)
    if existing is not None:
        return existing
    io.write_json(RunFolder.of(run_dir).plan, plan.to_json())
    return plan


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
