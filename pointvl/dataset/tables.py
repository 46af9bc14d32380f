"""Stage tables on disk: where a stage's shard goes, how it is written, and the check that it is what it claims.

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
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pointvl.core import io
from pointvl.core.errors import InputError
from pointvl.dataset.plan import Shard, fingerprint, load_plan
from pointvl.dataset.run_folder import RunFolder

logger = logging.getLogger(__name__)

MADE_FROM = b"pointvl.made_from"


class StageTableError(InputError):
    """A stage table failed its integrity check when read (the message names the file and the fix)."""


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
