"""Write a predictions file for :mod:`pointvl.evaluate`: greedy decoding of every record of a split.

One JSON line per instance, ``{"instance_id": ..., "output": "<raw model text>"}``, written atomically
once all instances are done. Prompts are decoded one at a time, so no prompt is padded and the
positions match training exactly.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from pointvl import io as pio
from pointvl.train.data import Collator, ShardExamples
from pointvl.train.model import PointVL3D

logger = logging.getLogger(__name__)


def predict(
    model: PointVL3D,
    tokenizer: Any,
    image_processor: Any,
    shards_dir: str,
    out_path: str,
    split: str = "test",
    max_new_tokens: int = 1024,
) -> int:
    """Greedy outputs for ``split`` of ``shards_dir`` written to ``out_path`` (JSONL); returns the count."""
    cfg = model.config
    if torch.cuda.is_available():  # a freshly loaded policy sits on the CPU; decoding belongs on the GPU
        model.to("cuda")
    device = next(model.parameters()).device
    collate = Collator(tokenizer, image_processor, model.num_point_tokens, with_targets=False)
    examples = ShardExamples(shards_dir, split, cfg.num_points, cfg.quant, shuffle=False)
    total = len(examples)
    lines = []
    model.eval()
    with torch.no_grad():
        for k, example in enumerate(examples, 1):
            inputs = {key: v.to(device) for key, v in collate([example]).items()}
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
            text = tokenizer.decode(ids[0], skip_special_tokens=True)
            lines.append(json.dumps({"instance_id": example.instance_id, "output": text}, ensure_ascii=False))
            logger.info("predict %d/%d %s (%d tokens)", k, total, example.instance_id, ids.shape[1])
    pio.write_bytes(out_path, ("\n".join(lines) + "\n").encode())
    return len(lines)
