"""Arrow columns of float32 arrays: point clouds, keypoints and boxes as Parquet list columns, and back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

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
