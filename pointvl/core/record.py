"""The benchmark record: one row per instance (``schemas/record.schema.json`` is the contract).

:func:`record_schema` is the same contract as Hugging Face ``datasets`` features: the shards carry
them in their Arrow schema metadata (``huggingface``), so ``datasets.load_dataset("parquet", ...)``
decodes the PNG columns as images and the arrays with their fixed shapes. The features are written
here in ``datasets``' own serialised form, so the build needs pyarrow only, not ``datasets``
(``tests/test_record.py`` checks them against ``datasets.Features``).

Reading records back (:func:`iter_records`, :func:`record_target`, :func:`record_camera`,
:func:`target_text`, ...) is here too, so training, evaluation and the reference predictors read a
record the same way without depending on each other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pointvl.core import io as pio
from pointvl.core.errors import InputError
from pointvl.core.geometry import QuantConfig
from pointvl.grca.parse import format_output

IMAGE_COLUMNS = ("render", "refined", "image", "mask", "depth", "normal_map")

_ARROW = {"string": pa.string(), "int32": pa.int32(), "float32": pa.float32(), "float64": pa.float64(),
          "bool": pa.bool_()}
_IMAGE = pa.struct({"bytes": pa.binary(), "path": pa.string()})


def _value(dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "_type": "Value"}


def _vector(length: int, dtype: str = "float32") -> dict[str, Any]:
    return {"feature": _value(dtype), "length": length, "_type": "List"}


def _matrix(width: int, dtype: str = "float32", rows: int = -1) -> dict[str, Any]:
    inner = _vector(width, dtype)
    return {"feature": inner, "_type": "List"} if rows == -1 else {"feature": inner, "length": rows, "_type": "List"}


def record_features(num_keypoints: int = 16) -> dict[str, dict[str, Any]]:
    """The record's features as ``datasets.Features.to_dict()`` writes them; keypoint counts are
    fixed per build (paper: 16)."""
    string, float32 = _value("string"), _value("float32")
    return {
        "instance_id": string, "synset_id": string, "model_id": string, "category": string, "split": string,
        "view_index": _value("int32"),
        "points": _matrix(3),
        "normals": _matrix(3),
        **{name: {"_type": "Image"} for name in IMAGE_COLUMNS},
        "depth_scale": float32,
        "K": _matrix(3, "float64", 3),
        "R": _matrix(3, "float64", 3),
        "t": _vector(3, "float64"),
        "width": _value("int32"),
        "height": _value("int32"),
        "elevation_deg": float32,
        "azimuth_deg": float32,
        "bbox2d": _vector(4),
        "bbox3d": _vector(6),
        "kpts2d": _matrix(2, rows=num_keypoints),
        "kpts3d": _matrix(3, rows=num_keypoints),
        "qa": string,
        "description": string,
        "bbox2d_mask": _vector(4),
        "bbox2d_vlm": _vector(4),
        "vlm_agreement": float32,
        "drift": float32,
        "flagged": _value("bool"),
        "provenance": string,
    }


def _arrow_type(feature: dict[str, Any]) -> pa.DataType:
    """``datasets``' Arrow type of a feature: a ``List`` with a length is a fixed-size list."""
    kind = feature["_type"]
    if kind == "Value":
        return _ARROW[feature["dtype"]]
    if kind == "Image":
        return _IMAGE
    item = _arrow_type(feature["feature"])
    length = feature.get("length", -1)
    return pa.list_(item) if length == -1 else pa.list_(item, length)


def record_schema(num_keypoints: int = 16) -> pa.Schema:
    """The shards' Arrow schema, with the features in its ``huggingface`` metadata."""
    features = record_features(num_keypoints)
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema([pa.field(name, _arrow_type(f)) for name, f in features.items()], metadata=metadata)


INSTRUCTION = (
    "Look at the object in the image and its point cloud. {question} Choices: {choices}.\n"
    "Reply with one JSON object with keys answer, description, bbox2d, bbox3d, kpts2d, kpts3d "
    "(coordinates as integer bins)."
)
"""Instruction template (version 1); ``{question}`` and ``{choices}`` come from the QA pair asked."""


def list_shards(shards_dir: str, split: str) -> list[str]:
    """Paths of ``{split}-*-of-*.parquet`` under ``shards_dir``, sorted; InputError if there are none."""
    fs, root = pio.filesystem(shards_dir)
    paths = pio.ls_matching(fs, root, f"{split}-*-of-*.parquet")
    if not paths:
        raise InputError(f"no {split}-*-of-*.parquet shards under {shards_dir}; run `pointvl build` first")
    return [fs.unstrip_protocol(p) if pio.is_url(shards_dir) else p for p in paths]


def iter_records(shards_dir: str, split: str) -> Iterator[dict[str, Any]]:
    """Records of ``split`` as dicts (one shard in memory at a time), in shard and row order."""
    for path in list_shards(shards_dir, split):
        yield from pio.read_table(path).to_pylist()


def qa_pairs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The QA pairs of a record (``qa`` is a JSON string list of ``{question, choices, answer}``)."""
    qa = json.loads(record["qa"]) if isinstance(record["qa"], str) else record["qa"]
    if not qa:
        raise ValueError(f"record {record['instance_id']} has no QA pair; the annotate stage writes >= 1")
    return qa


def first_qa(record: dict[str, Any]) -> dict[str, Any]:
    """``qa[0]`` of a record: the category question."""
    return qa_pairs(record)[0]


def record_target(record: dict[str, Any], qa_index: int = 0) -> dict[str, Any]:
    """Continuous targets of a record for QA pair ``qa_index``: ``bbox2d`` (px), ``bbox3d`` (world), ``answer``,
    ``description``."""
    return {
        "bbox2d": np.asarray(record["bbox2d"], dtype=np.float64).reshape(4),
        "bbox3d": np.asarray(record["bbox3d"], dtype=np.float64).reshape(6),
        "answer": str(qa_pairs(record)[qa_index]["answer"]),
        "description": str(record["description"]),
    }


def record_camera(record: dict[str, Any]) -> dict[str, Any]:
    """``K`` (3, 3), ``R`` (3, 3), ``t`` (3,), ``width``, ``height`` of a record."""
    return {
        "K": np.asarray(record["K"], dtype=np.float64).reshape(3, 3),
        "R": np.asarray(record["R"], dtype=np.float64).reshape(3, 3),
        "t": np.asarray(record["t"], dtype=np.float64).reshape(3),
        "width": int(record["width"]),
        "height": int(record["height"]),
    }


def instruction(record: dict[str, Any], qa_index: int = 0) -> str:
    qa = qa_pairs(record)[qa_index]
    return INSTRUCTION.format(question=qa["question"], choices=", ".join(map(str, qa["choices"])))


def target_text(record: dict[str, Any], quant: QuantConfig, qa_index: int = 0) -> str:
    """The SFT target: the canonical quantized output JSON of a record, answering QA pair ``qa_index``."""
    t = record_target(record, qa_index)
    return format_output(
        answer=t["answer"],
        description=t["description"],
        bbox2d=t["bbox2d"],
        bbox3d=t["bbox3d"],
        kpts2d=np.asarray(record["kpts2d"], dtype=np.float64).reshape(-1, 2),
        kpts3d=np.asarray(record["kpts3d"], dtype=np.float64).reshape(-1, 3),
        width=int(record["width"]),
        height=int(record["height"]),
        quant=quant,
    )


def image_bytes(value: bytes | dict[str, Any]) -> bytes:
    """PNG bytes of an image column: plain bytes, or the ``datasets`` Image struct ``{bytes, path}``."""
    return value["bytes"] if isinstance(value, dict) else value
