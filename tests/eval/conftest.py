"""Shards for the evaluation tests: the training tests' records (tests/train/conftest.py) at 90x90
pixels (not a multiple of 28, so Qwen2.5-VL's resize moves pixels) with two attribute questions."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from train.conftest import make_record

from pointvl.core import io as pio

SIZE = 90


def eval_record(i: int, split: str) -> dict:
    record = make_record(i, split, size=SIZE)
    qa = json.loads(record["qa"])
    qa.append({"question": "Is it boxy?", "choices": ["yes", "no"], "answer": "yes" if i % 2 else "no"})
    qa.append({"question": "What colour is it?", "choices": ["red", "grey"], "answer": "grey"})
    record["qa"] = json.dumps(qa)
    return record


def write_eval_shards(root: Path, counts: dict[str, int], per_shard: int = 4) -> str:
    out = str(root / "shards")
    start = 0
    for split, count in counts.items():
        n = -(-count // per_shard)
        for s in range(n):
            ids = range(start + s * per_shard, start + min(count, (s + 1) * per_shard))
            table = pa.Table.from_pylist([eval_record(j, split) for j in ids])
            pio.write_table(pio.join(out, f"{split}-{s:05d}-of-{n:05d}.parquet"), table)
        start += count
    return out


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """8 train, 8 test and 4 val records over 4 categories."""
    return write_eval_shards(tmp_path_factory.mktemp("eval"), {"train": 8, "test": 8, "val": 4})
