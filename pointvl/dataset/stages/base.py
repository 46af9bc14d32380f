"""The stage contract (:class:`Stage`) and what every per-shard stage shares: the finished test, integrity, drops.

A stage writes one table per work shard, ``RUN/stages/<stage>/shard-{i:05d}.parquet``, keyed by
``instance_id``, plus a stats JSON beside it (``instances``, ``dropped_<reason>``, ``seconds``). The stats are
written first and the table last, so a shard is finished exactly when its table exists and checks out.

Integrity. Each table records what it was made from in its Parquet metadata (``pointvl.made_from``:
the stage, the work shard, a digest of the plan shard's instances, and the checksum of every input
table it read); its stats record the table's own SHA-256. :func:`finished` and
:func:`read_stage_table` verify both: a table that is truncated, altered, from another shard or plan,
made from inputs that have changed since, or without its stats is moved to
``RUN/superseded/<time>/`` (never deleted) with a warning naming it, and counts as not finished,
so the stage recomputes it.

The contract. Every stage is a :class:`Stage` (datatrove's ``PipelineStep`` is the model): it
declares its ``name``, the stages whose tables it reads (``inputs``), its output ``schema`` and its
``config_class``, and implements only :meth:`Stage.process_shard`, the work of one shard. The base
owns the rest, the same for every stage: the finished test (a finished shard is skipped), timing,
uniform stats (``instances``: the rows written; ``dropped_<reason>``; ``seconds``), the check that
the table has the declared schema, and writing stats first and the table last.
:data:`pointvl.dataset.dag.STAGES` declares the DAG once; ``tests/stages/test_contract.py`` holds every
stage to the contract.

Drops. An error that belongs to one model or view (:data:`pointvl.core.errors.ITEM_ERRORS`) drops that item with a
named reason (:class:`Drops`, used through :meth:`Drops.guard`); the shard goes on. Storage errors
(``OSError``) and anything else still fail the shard: they are faults of the run, not of the item.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import trimesh

from pointvl.core import io
from pointvl.core.errors import ITEM_ERRORS, InputError
from pointvl.dataset.mesh import MeshError
from pointvl.dataset.plan import ModelEntry, Shard, fingerprint, load_plan
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.clean import load_model_file

logger = logging.getLogger(__name__)

MADE_FROM = b"pointvl.made_from"


class StageTableError(InputError):
    """A stage table failed its integrity check when read (the message names the file and the fix)."""


class Drops:
    """The items a stage dropped: ``dropped_<reason>`` counts and, per item, the reason and message."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.counts: Counter[str] = Counter()
        self.items: dict[str, str] = {}

    def add(self, item: str, reason: str, message: str, level: int = logging.WARNING) -> None:
        logger.log(level, "%s %s dropped (%s): %s", self.stage, item, reason, message)
        self.counts[reason] += 1
        self.items[item] = f"{reason}: {message}"[:500]

    @contextmanager
    def guard(self, item: str) -> Iterator[None]:
        """Run the block for one item; an item error drops the item instead of failing the shard."""
        try:
            yield
        except MeshError as err:
            self.add(item, err.reason, str(err))
        except ITEM_ERRORS as err:
            self.add(item, f"{self.stage}_failed", f"{type(err).__name__}: {err}")

    def check(self, total: int) -> None:
        """Fail the shard when each of its ``total`` (>= 2) items failed with an unforeseen error: that is a
        fault of the run (a broken GPU, a missing library), not of every model at once."""
        failed = self.counts[f"{self.stage}_failed"]
        if total >= 2 and failed == total:
            first = next(iter(self.items.values()))
            raise RuntimeError(f"{self.stage}: all {total} items failed ({first}); a fault of the run, not of the data")

    def stats(self) -> dict:
        """The entries for the stage's stats: ``dropped_<reason>`` counts and ``drops`` (item -> why)."""
        out: dict = {f"dropped_{reason}": n for reason, n in sorted(self.counts.items())}
        if self.items:
            out["drops"] = dict(sorted(self.items.items()))
        return out


def _identity(path: str) -> tuple | None:
    """``(path, size, mtime)`` of a file, to memoize work on unchanged files (None: cannot tell)."""
    fs, p = io.filesystem(path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        return None
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
    return (path, info.get("size"), str(stamp)) if stamp is not None else None


_sha_memo: dict[tuple, str] = {}
_plan_memo: dict[tuple, dict[int, str]] = {}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes (memoized per size and mtime within the process)."""
    key = _identity(path)
    if key is not None and key in _sha_memo:
        return _sha_memo[key]
    digest = sha256_bytes(io.read_bytes(path))
    if key is not None:
        _sha_memo[key] = digest
    return digest


def shard_digest(shard: Shard) -> str:
    """What a shard's outputs are made for: its index, split and instances with their geometry."""
    return fingerprint(shard.index, shard.split, shard.instance_ids(), [m.geometry for m in shard.models])


def _plan_digest(run_dir: str, shard_index: int) -> str:
    """The current plan's digest of shard ``shard_index``; "" without a plan (a stage run on its own)."""
    key = _identity(RunFolder.of(run_dir).plan)
    if key is None:
        return ""
    if key not in _plan_memo:
        _plan_memo[key] = {s.index: shard_digest(s) for s in load_plan(run_dir).shards}
    return _plan_memo[key].get(shard_index, "")


def _stats_or_none(run_dir: str, stage: str, shard_index: int) -> dict | None:
    try:
        stats = io.read_json(RunFolder.of(run_dir).stage_stats(stage, shard_index))
    except (FileNotFoundError, ValueError):  # no stats, or damaged (UnicodeDecodeError is a ValueError)
        return None
    return stats if isinstance(stats, dict) else None


def recorded_sha(run_dir: str, stage: str, shard_index: int) -> str | None:
    """The table checksum a stage's stats record (None: no stats, or stats without one)."""
    stats = _stats_or_none(run_dir, stage, shard_index)
    return stats.get("table_sha256") if stats is not None else None


def _adopt(run_dir: str, stage: str, shard_index: int, stats: dict) -> str | None:
    """A table written before tables recorded their origin: if it reads as Parquet, record its checksum
    (so it is checked from now on) rather than pay for it again; else say why it cannot be used."""
    folder = RunFolder.of(run_dir)
    path = folder.stage_table(stage, shard_index)
    data = io.read_bytes(path)
    try:
        meta = pq.read_metadata(pa.BufferReader(data)).metadata or {}
    except (pa.ArrowException, OSError) as err:
        return f"it is not a readable Parquet file ({type(err).__name__})"
    if MADE_FROM in meta:
        return "its stats lack the checksum it was written with"
    io.write_json(folder.stage_stats(stage, shard_index), {**stats, "table_sha256": sha256_bytes(data)})
    logger.info("%s: written by an earlier pointvl; its checksum is recorded now", path)
    return None


def write_stage_table(
    run_dir: str, stage: str, shard_index: int, table: pa.Table, stats: dict, inputs: Sequence[str] = ()
) -> None:
    """Write a stage's table for one shard with what it was made from; stats first, the table last.

    ``inputs``: the stages whose tables this one was computed from (their checksums are recorded, so
    a changed input makes this table stale).
    """
    folder = RunFolder.of(run_dir)
    made_from = {
        "stage": stage,
        "shard": shard_index,
        "plan_shard": _plan_digest(run_dir, shard_index),
        "inputs": {s: recorded_sha(run_dir, s, shard_index) for s in inputs},
    }
    meta = {**(table.schema.metadata or {}), MADE_FROM: json.dumps(made_from, sort_keys=True).encode()}
    data = io.table_bytes(table.replace_schema_metadata(meta))
    io.write_json(folder.stage_stats(stage, shard_index), {**stats, "table_sha256": sha256_bytes(data)})
    io.write_bytes(folder.stage_table(stage, shard_index), data)


def _problem(run_dir: str, stage: str, shard_index: int, data: bytes | None = None) -> str | None:
    """Why the shard's table of ``stage`` (its bytes ``data``, else read from the file, which exists)
    cannot be used; None when it checks out."""
    path = RunFolder.of(run_dir).stage_table(stage, shard_index)
    stats = _stats_or_none(run_dir, stage, shard_index)
    if stats is None:
        return "its stats file is missing or damaged, so its content cannot be checked"
    want = stats.get("table_sha256")
    if want is None:
        return _adopt(run_dir, stage, shard_index, stats)
    if (sha256_bytes(data) if data is not None else file_sha256(path)) != want:
        return "its bytes do not match the checksum in its stats (truncated or altered)"
    if data is not None:
        meta = pq.read_schema(pa.BufferReader(data)).metadata or {}
    else:
        fs, p = io.filesystem(path)
        with fs.open(p, "rb") as f:  # the footer only
            meta = pq.read_schema(f).metadata or {}
    if MADE_FROM not in meta:  # adopted from an earlier pointvl
        return None
    try:
        made = json.loads(meta[MADE_FROM])
    except ValueError:
        return "its record of what it was made from is damaged"
    if made.get("stage") != stage or made.get("shard") != shard_index:
        return f"it was made for {made.get('stage')} shard {made.get('shard')}"
    current = _plan_digest(run_dir, shard_index)
    if current and made.get("plan_shard") and made["plan_shard"] != current:
        return "it was made for other instances than the plan's shard"
    for name, sha in (made.get("inputs") or {}).items():
        if recorded_sha(run_dir, name, shard_index) != sha:
            return f"its input, the {name} table, has changed since it was made"
    return None


def move_aside(run_dir: str, paths: Sequence[str], why: str) -> str:
    """Move ``paths`` (those that exist) to ``RUN/superseded/<time>/`` keeping their relative paths.

    Nothing is deleted: a person can inspect or restore what was moved. Returns the folder used.
    """
    fs, root = io.filesystem(run_dir)
    aside = io.filesystem(RunFolder.of(run_dir).superseded_now())[1]
    for path in paths:
        p = io.filesystem(path)[1]
        if fs.exists(p):
            io.check_fence(path)
            target = f"{aside}/{p.removeprefix(root + '/')}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.mv(p, target, recursive=True)
    rel = [io.filesystem(p)[1].removeprefix(root + "/") for p in paths]
    logger.warning("%s: %s; moved to %s, to be recomputed", rel[0], why, aside.removeprefix(root + "/"))
    return aside


def finished(run_dir: str, stage: str, shard_index: int) -> bool:
    """Whether the shard's table of ``stage`` exists and checks out; a table that does not is moved
    aside (with a warning) and the shard counts as not finished."""
    folder = RunFolder.of(run_dir)
    path = folder.stage_table(stage, shard_index)
    if not io.exists(path):
        return False
    problem = _problem(run_dir, stage, shard_index)
    if problem is None:
        return True
    move_aside(run_dir, [path, folder.stage_stats(stage, shard_index)], problem)
    return False


def read_stage_table(run_dir: str, stage: str, shard_index: int) -> pa.Table:
    """The shard's table of ``stage``, verified (raises :class:`StageTableError` when it does not check out)."""
    path = RunFolder.of(run_dir).stage_table(stage, shard_index)
    if not io.exists(path):
        raise FileNotFoundError(f"{path} is missing: run the {stage} stage for shard {shard_index} first")
    data = io.read_bytes(path)
    problem = _problem(run_dir, stage, shard_index, data)
    if problem is not None:
        raise StageTableError(f"{path}: {problem}; re-run the build to recompute it")
    table = pq.read_table(pa.BufferReader(data))
    return table.replace_schema_metadata({k: v for k, v in (table.schema.metadata or {}).items() if k != MADE_FROM})


def ran(run_dir: RunFolder | str, stage: str, shard_index: int) -> bool:
    """Whether ``stage`` ran for the shard: its table exists. An optional input (synthesize, annotate, ...)
    is left out only when it did not run; one that ran is read with :func:`read_stage_table`, so a damaged
    table is refused, never taken for a stage that did not run."""
    return io.exists(RunFolder.of(run_dir).stage_table(stage, shard_index))


def read_stats(run_dir: str, stage: str, shard_index: int) -> dict:
    return io.read_json(RunFolder.of(run_dir).stage_stats(stage, shard_index))


MATRIX3 = pa.list_(pa.list_(pa.float32(), 3))
"""The type of a column of ``(n, 3)`` float32 matrices (point clouds, keypoints)."""


def matrix_column(arrays: list[np.ndarray], width: int) -> pa.Array:
    """A list of ``(n_i, width)`` float32 arrays as ``list<fixed_size_list<float32, width>>``."""
    lengths = [len(a) for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays]) if arrays else []
    rows = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), width)
    return pa.ListArray.from_arrays(pa.array(offsets), rows)


def vector_column(arrays: list[np.ndarray], width: int) -> pa.Array:
    """A list of ``(width,)`` float32 vectors as ``fixed_size_list<float32, width>``."""
    flat = np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays]) if arrays else []
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), width)


def to_numpy_matrix(value: list) -> np.ndarray:
    """One cell of a matrix column (a list of lists) back to a float32 array."""
    return np.asarray(value, dtype=np.float32)


def shard_meshes(shard: Shard, stage: str, drops: Drops) -> Iterator[tuple[ModelEntry, trimesh.Trimesh]]:
    """Each model of the shard with its normalized mesh (:func:`pointvl.dataset.stages.clean.load_model_file`: a
    local path or a URL); a model that fails to load is dropped with its reason."""
    for i, model in enumerate(shard.models, 1):
        mesh = None
        with drops.guard(f"{model.synset_id}/{model.model_id}"):
            mesh = load_model_file(model.obj_path)
        if mesh is not None:
            yield model, mesh
        logger.debug("%s %s %d/%d", stage, shard.name, i, len(shard.models))


@dataclass
class ShardOutput:
    """What :meth:`Stage.process_shard` made: the rows (or a table) and the stage's own stats entries."""

    rows: list[dict] | pa.Table
    stats: dict = field(default_factory=dict)
    made_from: tuple[str, ...] | None = None
    """The input tables actually read, when a stage reads only some of its ``inputs`` (else all)."""


class Stage(ABC):
    """One stage of the build: one table per work shard, made from the plan and its input tables."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    schema: pa.Schema
    config_class: ClassVar[type]

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()

    def finished(self, run: RunFolder | str, shard_index: int) -> bool:
        """Whether the shard's table exists and checks out (:func:`finished`)."""
        return finished(run, self.name, shard_index)

    def run_shard(self, run: RunFolder | str, shard_index: int) -> dict:
        """Make the shard's table unless it is finished; returns the shard's stats (``skipped`` when it was)."""
        if self.finished(run, shard_index):
            logger.info("%s shard-%05d already finished: skipped", self.name, shard_index)
            return read_stats(run, self.name, shard_index) | {"skipped": True}
        start = time.perf_counter()
        drops = Drops(self.name)
        out = self.process_shard(RunFolder.of(run), shard_index, drops)
        out = out if isinstance(out, ShardOutput) else ShardOutput(out)
        return self.write(run, shard_index, out, drops, time.perf_counter() - start)

    @abstractmethod
    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> list[dict] | ShardOutput:
        """The rows of one shard's table (an item that fails goes into ``drops`` with its reason)."""

    def to_table(self, rows: list[dict] | pa.Table) -> pa.Table:
        """The rows as a table of :attr:`schema` (stages with matrix columns build them faster)."""
        return rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=self.schema)

    def write(self, run: RunFolder | str, shard_index: int, out: ShardOutput | list[dict], drops: Drops,
              seconds: float) -> dict:
        """Write the shard's table and its stats (stats first, the table last); returns the stats."""
        out = out if isinstance(out, ShardOutput) else ShardOutput(out)
        table = self.to_table(out.rows)
        if not table.schema.equals(self.schema):
            raise TypeError(f"{self.name}: the table's schema {table.schema} is not the declared {self.schema}")
        stats = {"instances": table.num_rows, **drops.stats(), **out.stats, "seconds": round(seconds, 3)}
        made_from = self.inputs if out.made_from is None else out.made_from
        write_stage_table(run, self.name, shard_index, table, stats, inputs=made_from)
        return stats
