"""Two reference predictors that need no model: ``pointvl predict --reference NAME`` (``make eval-demo``).

They give a newcomer the two ends of the scale:

- ``ground-truth``: each record's own targets in the benchmark's bins (the SFT target,
  :func:`pointvl.train.data.target_text`) and its attribute answers: the upper bound (geometry just
  under 1 from quantization; language 1).
- ``mean-box``: an honest baseline that is told each test record's category and nothing else about
  it: the train split's per-category mean bbox2d (as a fraction of the image), bbox3d, kpts2d and
  kpts3d (mean per keypoint index), the category's most frequent train description, and for every
  question the most frequent train answer to the same question text that is among the record's
  choices (else the first choice). A category absent from train falls back to the all-train means.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from pointvl.core import io as pio
from pointvl.core.errors import InputError
from pointvl.core.record import iter_records, target_text
from pointvl.core.spatial import QuantConfig
from pointvl.grca.parse import format_output

REFERENCES: tuple[str, ...] = ("ground-truth", "mean-box")


def _qa(record: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(record["qa"]) if isinstance(record["qa"], str) else list(record["qa"])


class _Means:
    """Running sums of one group of train records."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, np.ndarray] = {}
        self.descriptions: Counter[str] = Counter()

    def add(self, record: dict[str, Any]) -> None:
        size = np.array([record["width"], record["height"]], dtype=np.float64)
        values = {
            "bbox2d": np.asarray(record["bbox2d"], dtype=np.float64).reshape(2, 2) / size,
            "bbox3d": np.asarray(record["bbox3d"], dtype=np.float64).reshape(6),
            "kpts2d": np.asarray(record["kpts2d"], dtype=np.float64).reshape(-1, 2) / size,
            "kpts3d": np.asarray(record["kpts3d"], dtype=np.float64).reshape(-1, 3),
        }
        for k, v in values.items():
            if k in self.sums and self.sums[k].shape != v.shape:
                raise InputError(f"train record {record['instance_id']} has {k} of shape {v.shape}, "
                                 f"others {self.sums[k].shape}")
            self.sums[k] = self.sums.get(k, 0) + v
        self.n += 1
        self.descriptions[str(record["description"])] += 1

    def mean(self, key: str) -> np.ndarray:
        return self.sums[key] / self.n


def mean_box_lines(shards_dir: str, split: str, quant: QuantConfig) -> list[dict[str, Any]]:
    """The ``mean-box`` baseline's prediction lines for ``split`` (statistics from the train split)."""
    groups: dict[str, _Means] = defaultdict(_Means)
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    for record in iter_records(shards_dir, "train"):
        for group in (str(record["category"]), ""):  # "" = every train record, the fallback
            groups[group].add(record)
        for qa in _qa(record):
            answers[qa["question"]][str(qa["answer"])] += 1

    def pick(qa: dict[str, Any]) -> str:
        choices = [str(c) for c in qa["choices"]]
        ranked = [a for a, _ in answers[qa["question"]].most_common() if a in choices]
        return ranked[0] if ranked else choices[0]

    lines = []
    for record in iter_records(shards_dir, split):
        g = groups.get(str(record["category"])) or groups[""]
        size = np.array([record["width"], record["height"]], dtype=np.float64)
        qa = _qa(record)
        output = format_output(
            answer=pick(qa[0]), description=g.descriptions.most_common(1)[0][0],
            bbox2d=(g.mean("bbox2d") * size).reshape(4), bbox3d=g.mean("bbox3d"),
            kpts2d=g.mean("kpts2d") * size, kpts3d=g.mean("kpts3d"),
            width=int(record["width"]), height=int(record["height"]), quant=quant,
        )
        lines.append({"instance_id": record["instance_id"], "output": output,
                      "attribute_answers": [pick(q) for q in qa[1:]]})
    return lines


def ground_truth_lines(shards_dir: str, split: str, quant: QuantConfig) -> list[dict[str, Any]]:
    """The ``ground-truth`` prediction lines for ``split``: every record's own targets."""
    return [{"instance_id": r["instance_id"], "output": target_text(r, quant),
             "attribute_answers": [str(q["answer"]) for q in _qa(r)[1:]]} for r in iter_records(shards_dir, split)]


def write_reference(name: str, shards_dir: str, out_path: str, split: str = "test",
                    quant: QuantConfig | None = None) -> int:
    """Write reference predictor ``name``'s JSONL for ``split`` to ``out_path``; returns the line count."""
    q = quant or QuantConfig()
    if name not in REFERENCES:
        raise InputError(f"--reference must be one of {', '.join(REFERENCES)}, got {name!r}")
    lines = ground_truth_lines(shards_dir, split, q) if name == "ground-truth" else mean_box_lines(shards_dir, split, q)
    pio.write_bytes(out_path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode())
    return len(lines)
