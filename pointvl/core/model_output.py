"""The model-output contract's writer: the canonical JSON the policy is trained to write.

The object (``docs/design.md#model-output``, ``schemas/model_output.schema.json``)::

    {"answer": str, "description": str, "bbox2d": [4 ints], "bbox3d": [6 ints],
     "kpts2d": [[2 ints] x K], "kpts3d": [[3 ints] x K]}

with coordinates as integer bins of :class:`pointvl.core.spatial.QuantConfig`. The record's SFT target
(:func:`pointvl.core.record.target_text`) and the reference predictors write it; its reader, which also
finds each field's character span for the routing, is :func:`pointvl.grca.parse.parse_output`.
"""

from __future__ import annotations

import json

import numpy as np
from numpy.typing import ArrayLike

from pointvl.core.spatial import QuantConfig


def format_output(
    answer: str,
    description: str,
    bbox2d: ArrayLike,
    bbox3d: ArrayLike,
    kpts2d: ArrayLike,
    kpts3d: ArrayLike,
    width: float,
    height: float,
    quant: QuantConfig,
) -> str:
    """The canonical output string (SFT target) for continuous targets, quantized with ``quant``.

    ``bbox2d``/``kpts2d`` are pixels of a ``width x height`` image, ``bbox3d``/``kpts3d`` world units.
    Keys in the contract's order (``docs/design.md#model-output``), ``json.dumps`` separators (``", "``,
    ``": "``), non-ASCII text kept as is.
    ``pointvl.grca.parse.parse_output(format_output(...), quant.bins)`` returns the same strings and the
    quantized bins.
    """
    k2 = np.asarray(kpts2d, dtype=np.float64)
    k3 = np.asarray(kpts3d, dtype=np.float64)
    if k2.ndim != 2 or k2.shape[1] != 2 or k3.ndim != 2 or k3.shape[1] != 3 or not len(k2) or not len(k3):
        raise ValueError(f"kpts2d must be (K, 2) and kpts3d (K, 3) with K >= 1, got {k2.shape}, {k3.shape}")
    b2 = np.asarray(bbox2d, dtype=np.float64).reshape(-1)
    b3 = np.asarray(bbox3d, dtype=np.float64).reshape(-1)
    if b2.shape != (4,) or b3.shape != (6,):
        raise ValueError(f"bbox2d must hold 4 numbers and bbox3d 6, got {b2.shape}, {b3.shape}")
    obj = {
        "answer": str(answer),
        "description": str(description),
        "bbox2d": quant.quantize_2d(b2, width, height).tolist(),
        "bbox3d": quant.quantize_3d(b3).tolist(),
        "kpts2d": quant.quantize_2d(k2, width, height).tolist(),
        "kpts3d": quant.quantize_3d(k3).tolist(),
    }
    return json.dumps(obj, ensure_ascii=False)
