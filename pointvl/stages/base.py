"""What every per-shard stage shares: its output location, the finished test, array columns.

A stage writes one table per work shard, ``RUN/stages/<stage>/shard-{i:05d}.parquet``, keyed by
``instance_id``, plus a stats JSON beside it (counts, ``dropped_<reason>``, seconds). The stats are
written first and the table last, so a shard is finished exactly when its table exists.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import trimesh

from pointvl import io
from pointvl.mesh import MeshError, load_mesh
from pointvl.plan import Shard, stage_table_path
from pointvl.stages.clean import ModelEntry

logger = logging.getLogger(__name__)


def finished(run_dir: str, stage: str, shard_index: int) -> bool:
    return io.exists(stage_table_path(run_dir, stage, shard_index))


def stats_path(run_dir: str, stage: str, shard_index: int) -> str:
    return stage_table_path(run_dir, stage, shard_index).removesuffix(".parquet") + ".stats.json"


def write_stage_table(run_dir: str, stage: str, shard_index: int, table: pa.Table, stats: dict) -> None:
    io.write_json(stats_path(run_dir, stage, shard_index), stats)
    io.write_table(stage_table_path(run_dir, stage, shard_index), table)


def read_stage_table(run_dir: str, stage: str, shard_index: int) -> pa.Table:
    return io.read_table(stage_table_path(run_dir, stage, shard_index))


def read_stats(run_dir: str, stage: str, shard_index: int) -> dict:
    return io.read_json(stats_path(run_dir, stage, shard_index))


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


def shard_meshes(shard: Shard, stage: str, dropped: Counter[str]) -> Iterator[tuple[ModelEntry, trimesh.Trimesh]]:
    """Each model of the shard with its mesh; a mesh that fails to load is counted in ``dropped``."""
    for i, model in enumerate(shard.models, 1):
        try:
            mesh = load_mesh(model.obj_path)
        except MeshError as err:
            logger.warning("%s/%s dropped: %s", model.synset_id, model.model_id, err)
            dropped[f"dropped_{err.reason}"] += 1
            continue
        yield model, mesh
        logger.debug("%s %s %d/%d", stage, shard.name, i, len(shard.models))
