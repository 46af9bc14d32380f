"""The stage contract: :class:`Stage`, what a stage's shard made (:class:`ShardOutput`), its drops (:class:`Drops`).

Every stage is a :class:`Stage` (datatrove's ``PipelineStep`` is the model): it declares its ``name``,
the stages whose tables it reads (``inputs``), its output ``schema`` and its ``config_class``, and
implements only :meth:`Stage.process_shard`, the work of one shard. The base owns the rest, the same
for every stage (:meth:`Stage.run_shard`): the finished test (a finished shard is skipped), timing,
uniform stats (``instances``: the rows written; ``dropped_<reason>``; ``seconds``), the check that
the table has the declared schema, and writing stats first and the table last
(:mod:`pointvl.dataset.tables`: the table layout and its integrity checks). Two kinds of stage implement
less: a :class:`MeshStage` reads each model's mesh and implements only :meth:`MeshStage.model_rows`, and a
:class:`RowStage` implements only :meth:`RowStage.rows` from its input's rows, so the CPU worker
(:mod:`pointvl.dataset.cpu_stages`) reads each mesh once for all of them and hands on what it made.
:data:`pointvl.dataset.dag.STAGES` declares the DAG once; ``tests/stages/test_contract.py`` holds every
stage to the contract.

Drops. An error that belongs to one model or view (:data:`pointvl.core.errors.ITEM_ERRORS`) drops that item with a
named reason (:class:`Drops`, used through :meth:`Drops.guard`); the shard goes on. Storage errors
(``OSError``) and anything else still fail the shard: they are faults of the run, not of the item.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import trimesh

from pointvl.core.errors import ITEM_ERRORS
from pointvl.dataset.mesh import MeshError, model_meshes
from pointvl.dataset.plan import ModelEntry, load_plan
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.tables import finished, read_stage_table, read_stats, write_stage_table

logger = logging.getLogger(__name__)


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
        except ITEM_ERRORS as err:
            self.add_error(item, err)

    def add_error(self, item: str, err: Exception) -> None:
        """Drop ``item`` for an item error: a mesh that cannot be used gives its reason, anything else
        ``<stage>_failed``."""
        if isinstance(err, MeshError):
            self.add(item, err.reason, str(err))
        else:
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


@dataclass
class ShardOutput:
    """What :meth:`Stage.process_shard` made: the rows (or a table) and the stage's own stats entries."""

    rows: list[dict] | pa.Table
    stats: dict = field(default_factory=dict)
    made_from: tuple[str, ...] | None = None
    """The input tables actually read, when a stage reads only some of its ``inputs`` (else all)."""


@dataclass
class ShardJob:
    """One stage's job on one shard (:meth:`Stage.open_shard`), from the finished test to the write.

    ``done``: the shard's stats once it is finished (before: it is skipped); until then the work drops
    its failed items into ``drops``, runs under :meth:`timed` (the shard's ``seconds`` add up those
    blocks), and :meth:`write` ends the job. :meth:`Stage.run_shard` is one such job; the CPU worker
    holds several open at once, to read each mesh once for all of them.
    """

    stage: Stage
    run: RunFolder
    shard_index: int
    done: dict | None
    drops: Drops
    seconds: float = 0.0

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def write(self, out: ShardOutput | list[dict]) -> dict:
        """Write the shard's table and its stats (:meth:`Stage.write`); the stats are ``done`` from now on."""
        self.done = self.stage.write(self.run, self.shard_index, out, self.drops, self.seconds)
        return self.done


class Stage(ABC):
    """One stage of the build: one table per work shard, made from the plan and its input tables."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    schema: pa.Schema
    config_class: ClassVar[type]

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()

    def finished(self, run: RunFolder | str, shard_index: int) -> bool:
        """Whether the shard's table exists and checks out (:func:`pointvl.dataset.tables.finished`)."""
        return finished(run, self.name, shard_index)

    def open_shard(self, run: RunFolder | str, shard_index: int) -> ShardJob:
        """The shard's job: ``done`` holds its stats (``skipped``) when it is finished."""
        done = None
        if self.finished(run, shard_index):
            logger.info("%s shard-%05d already finished: skipped", self.name, shard_index)
            done = read_stats(run, self.name, shard_index) | {"skipped": True}
        return ShardJob(self, RunFolder.of(run), shard_index, done, Drops(self.name))

    def run_shard(self, run: RunFolder | str, shard_index: int) -> dict:
        """Make the shard's table unless it is finished; returns the shard's stats (``skipped`` when it was)."""
        job = self.open_shard(run, shard_index)
        if job.done is not None:
            return job.done
        with job.timed():
            out = self.process_shard(job.run, shard_index, job.drops)
        return job.write(out)

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


class MeshStage(Stage):
    """A stage that reads each model's mesh (``sample_points``, ``render``): it implements
    :meth:`model_rows`, the rows of one model; :meth:`process_shard` reads the shard's meshes one at a time."""

    @abstractmethod
    def model_rows(self, model: ModelEntry, mesh: trimesh.Trimesh, views_per_model: int, drops: Drops) -> list[dict]:
        """The rows of one model's views (a failure drops the model into ``drops`` and gives no rows)."""

    def output(self, rows: list[dict]) -> ShardOutput:
        """The shard's output from its models' rows (a stage adds its own stats entries here)."""
        return ShardOutput(rows)

    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> ShardOutput:
        shard = load_plan(run).shards[shard_index]
        rows: list[dict] = []
        for model, mesh in model_meshes(shard.models, drops.add_error):
            rows.extend(self.model_rows(model, mesh, shard.views_per_model, drops))
        drops.check(len(shard.models))
        return self.output(rows)


class RowStage(Stage):
    """A stage made row by row from the rows of its one input stage (``geometry`` from the clouds, ``kpts2d``
    from the masks): it implements :meth:`rows`; :meth:`process_shard` reads the ``input_columns`` of the
    input's table, where the CPU worker passes the rows it has just made."""

    input_columns: ClassVar[tuple[str, ...]]

    @abstractmethod
    def rows(self, inputs: list[dict], drops: Drops) -> list[dict]:
        """The rows made from the input's rows (an item that fails goes into ``drops``)."""

    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> list[dict]:
        (source,) = self.inputs
        return self.rows(read_stage_table(run, source, shard_index).select(list(self.input_columns)).to_pylist(), drops)
