"""Training examples from the benchmark's Parquet shards (``schemas/README.md``, ``docs/design.md#record``).

Every QA pair of a record gives one example (the policy answers one question per prompt):

- **prompt**: the final photoreal ``image``, the ``points`` (resampled to ``num_points``) and the
  instruction :data:`pointvl.core.record.INSTRUCTION`, which asks the pair's question (``qa[k]``; ``qa[0]`` is the
  multiple-choice category question, the others ask attributes) with its choices and the six-field
  JSON answer;
- **target**: the canonical quantized JSON (:func:`pointvl.grca.parse.format_output`) with
  ``answer = qa[k].answer``, the record's ``description`` and its four geometric targets.

Shards are read one at a time (``{split}-{i:05d}-of-{n:05d}.parquet`` in file-name order), so a
split of any size streams with one shard in memory. The record helpers (:mod:`pointvl.core.record`) give the
evaluation its targets and cameras, so training and scoring read a record the same way.
"""

from __future__ import annotations

import io
import json
import logging
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from numpy.typing import NDArray

from pointvl.core import io as pio
from pointvl.core.record import image_bytes, instruction, list_shards, record_camera, record_target, target_text
from pointvl.core.spatial import QuantConfig

logger = logging.getLogger(__name__)


def resample_points(points: NDArray, num_points: int, seed: int) -> NDArray[np.float32]:
    """``num_points`` rows of ``points`` (N, C): a seeded subset when N >= num_points, else with repeats."""
    p = np.asarray(points, dtype=np.float32)
    if len(p) == 0:
        raise ValueError("a record has an empty point cloud; the sample_points stage writes N > 0")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(p), size=num_points, replace=len(p) < num_points)
    return p[np.sort(idx)]


@dataclass
class Example:
    """One prompt with its target and what the rewards need."""

    instance_id: str
    image: Any  # PIL.Image.Image, RGB
    points: NDArray[np.float32]  # (num_points, 3) xyz, or (num_points, 6) xyz + rgb (record_cloud)
    instruction: str
    target: str
    reward_target: dict[str, Any]
    camera: dict[str, Any]
    qa_index: int = 0


def record_cloud(record: dict[str, Any]) -> NDArray[np.float32]:
    """The record's cloud in its own frame: (N, 3) xyz, or (N, 6) xyz + rgb when the record has the
    optional ``colors`` column (N x 3 in [0, 1]). Point-BERT normalises it
    (:meth:`pointvl.train.point_bert.PointBERT.prepare`)."""
    xyz = np.asarray(record["points"], dtype=np.float32).reshape(-1, 3)
    colors = record.get("colors")  # optional column; the benchmark's records carry xyz only
    if colors is None or len(colors) == 0:
        return xyz
    rgb = np.asarray(colors, dtype=np.float32).reshape(-1, 3)
    if len(rgb) != len(xyz):
        raise ValueError(f"record {record['instance_id']}: {len(rgb)} colors for {len(xyz)} points")
    return np.concatenate([xyz, rgb], axis=1)


def make_example(record: dict[str, Any], num_points: int, quant: QuantConfig, qa_index: int = 0) -> Example:
    from PIL import Image

    seed = zlib.crc32(record["instance_id"].encode())
    return Example(
        instance_id=record["instance_id"],
        image=Image.open(io.BytesIO(image_bytes(record["image"]))).convert("RGB"),
        points=resample_points(record_cloud(record), num_points, seed),
        instruction=instruction(record, qa_index),
        target=target_text(record, quant, qa_index),
        reward_target=record_target(record, qa_index),
        camera=record_camera(record),
        qa_index=qa_index,
    )


class ShardExamples:
    """The :class:`Example` s (one per QA pair of each record) of one split, shard by shard.

    ``shuffle`` permutes the shard order and the prompts inside each shard with ``seed + epoch``
    (set :attr:`epoch` before each pass); the whole split is never held in memory.
    :meth:`iterate` starts at a position of the pass without building the examples before it (a
    resumed run skips what it has trained on; shards wholly before the position are not read).
    """

    def __init__(
        self, shards_dir: str, split: str, num_points: int, quant: QuantConfig, shuffle: bool, seed: int = 0
    ) -> None:
        self.paths = list_shards(shards_dir, split)
        self.num_points, self.quant, self.shuffle, self.seed = num_points, quant, shuffle, seed
        self.epoch = 0
        self._counts: list[list[int]] | None = None

    def qa_counts(self) -> list[list[int]]:
        """QA pairs per row of each shard (reads only the ``qa`` column)."""
        if self._counts is None:
            self._counts = []
            for path in self.paths:
                fs, p = pio.filesystem(path)
                with fs.open(p, "rb") as f:
                    column = pq.read_table(f, columns=["qa"]).column("qa").to_pylist()
                self._counts.append([len(json.loads(q) if isinstance(q, str) else q) for q in column])
        return self._counts

    def iterate(self, start: int = 0, keep: Callable[[int], bool] | None = None) -> Iterator[tuple[int, Example]]:
        """``(position, example)`` of pass :attr:`epoch` from position ``start`` on; with ``keep``, only the
        positions it accepts are built (e.g. one data-parallel rank's)."""
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.paths)))
        if self.shuffle:
            rng.shuffle(order)
        position = 0
        for shard in order:
            prompts = [(row, k) for row, n in enumerate(self.qa_counts()[shard]) for k in range(n)]
            if self.shuffle:
                rng.shuffle(prompts)
            if position + len(prompts) <= start:
                position += len(prompts)
                continue
            rows = pio.read_table(self.paths[shard]).to_pylist()
            for row, k in prompts:
                if position >= start and (keep is None or keep(position)):
                    yield position, make_example(rows[row], self.num_points, self.quant, k)
                position += 1

    def __iter__(self) -> Iterator[Example]:
        return (example for _, example in self.iterate())

    def stream(self, start: int, keep: Callable[[int], bool] | None = None) -> Iterator[tuple[int, Example]]:
        """``(position, example)`` over pass after pass from global position ``start``; position ``p`` of the
        stream is position ``p % len(self)`` of pass ``p // len(self)`` (sets :attr:`epoch`)."""
        n = len(self)
        epoch, offset = divmod(start, n)
        while True:
            self.epoch, base = epoch, epoch * n
            for p, example in self.iterate(offset, None if keep is None else lambda p, b=base: keep(b + p)):
                yield base + p, example
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        return sum(sum(c) for c in self.qa_counts())


class Collator:
    """Batches :class:`Example` s into model inputs.

    ``input_ids`` = tokenized chat prompt (:func:`pointvl.train.model.build_prompt`), then, with
    ``with_targets``, the target JSON and ``<|im_end|>`` (the token generation stops on,
    :data:`pointvl.train.generation.STOP_TOKEN`, whatever ``tokenizer.eos_token`` is); right padding (left
    with ``pad_left``, for batched generation). ``labels`` copy the target and ``<|im_end|>`` tokens and are
    -100 elsewhere (SFT loss on the answer tokens only, eq. 5). The prompt and the target are tokenized
    separately, so the label boundary is exact for any tokenizer.
    """

    def __init__(
        self, tokenizer: Any, image_processor: Any, num_point_tokens: int, with_targets: bool, pad_left: bool = False
    ) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_point_tokens, self.with_targets, self.pad_left = num_point_tokens, with_targets, pad_left

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        import torch

        from pointvl.train.generation import stop_token_id
        from pointvl.train.model import build_prompt

        tok = self.tokenizer
        stop = [stop_token_id(tok)]
        rows, labels = [], []
        for e in examples:
            prompt = tok(build_prompt(e.instruction, self.num_point_tokens), add_special_tokens=False).input_ids
            answer = tok(e.target, add_special_tokens=False).input_ids + stop if self.with_targets else []
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        label_t = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
            cols = slice(width - len(r), width) if self.pad_left else slice(0, len(r))
            input_ids[i, cols] = torch.tensor(r)
            attention[i, cols] = 1
            label_t[i, cols] = torch.tensor(lab)
        pixels = self.image_processor(images=[e.image for e in examples], return_tensors="pt")
        widths = {e.points.shape[1] for e in examples}
        if len(widths) > 1:
            raise ValueError("a batch mixes clouds with and without colors: a split's records carry the optional "
                             "colors column all or none")
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "points": torch.from_numpy(np.stack([e.points for e in examples])),
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": pixels["image_grid_thw"],
        }
        if self.with_targets:
            batch["labels"] = label_t
        return batch
