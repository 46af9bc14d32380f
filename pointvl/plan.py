"""The shard plan of a build: fixed once written, so a resumed run processes the same units.

Work is planned in shards of models (all views of a model stay in one shard). A shard holds one
split only; shard ``i`` of split ``s`` becomes the final file ``{s}-{i:05d}-of-{n:05d}.parquet``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from pointvl import io
from pointvl.errors import InputError
from pointvl.stages.clean import ModelEntry

SPLITS = ("train", "test")


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
    return f"{synset_id}-{model_id}-{view_index}"


def plan_path(run_dir: str) -> str:
    return io.join(run_dir, "plan.json")


def stage_table_path(run_dir: str, stage: str, shard_index: int) -> str:
    """Where stage ``stage`` writes its table for work shard ``shard_index``."""
    return io.join(run_dir, "stages", stage, f"shard-{shard_index:05d}.parquet")


def make_plan(models: list[ModelEntry], shard_size: int, views_per_model: int, fingerprint: str) -> Plan:
    """Chunk each split's models (in their given order) into shards of ``shard_size`` instances."""
    models_per_shard = max(1, shard_size // views_per_model)
    shards: list[Shard] = []
    for split in SPLITS:
        in_split = [m for m in models if m.split == split]
        chunks = [in_split[i : i + models_per_shard] for i in range(0, len(in_split), models_per_shard)]
        for j, chunk in enumerate(chunks):
            shards.append(Shard(len(shards), split, j, len(chunks), tuple(chunk), views_per_model))
    return Plan(tuple(shards), fingerprint)


def load_plan(run_dir: str) -> Plan:
    return Plan.from_json(io.read_json(plan_path(run_dir)))


def save_or_check_plan(run_dir: str, plan: Plan) -> Plan:
    """Write ``plan`` unless the run already has one; an existing plan must have the same fingerprint.

    Re-planning a half-written run would shuffle instances between shard files, so a run folder
    keeps the plan it started with; a changed input or config needs a new output folder.
    """
    path = plan_path(run_dir)
    if io.exists(path):
        existing = load_plan(run_dir)
        if existing.fingerprint != plan.fingerprint:
            raise PlanMismatchError(
                f"{run_dir} was built from another input or config (plan fingerprint "
                f"{existing.fingerprint[:12]} != {plan.fingerprint[:12]}); use a new --out folder, "
                "or the original input and config to resume"
            )
        return existing
    io.write_json(path, plan.to_json())
    return plan


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
