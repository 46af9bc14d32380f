"""Write a predictions file for :mod:`pointvl.evaluation.scoring`: greedy answers to every QA pair of a split.

One JSON line per prompt, ``{"instance_id": ..., "qa_index": k, "output": "<raw model text>"}`` (one
prompt per QA pair, :mod:`pointvl.train.data`), written atomically once all prompts are done. Lines
come in record order; within a record the category question (``qa_index`` 0) comes last, so a reader
that keys lines by ``instance_id`` alone scores the category answer.

Work is split across the processes of an ``accelerate launch`` (prompt ``p`` to rank ``p % world``);
each rank decodes only its prompts, ``batch_size`` at a time (left-padded: the positions follow the
attention mask, so an answer does not depend on its batch), and rank 0 merges the ranks' parts.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from pointvl.core import io as pio
from pointvl.train.data import Collator, ShardExamples
from pointvl.train.generation import greedy_config
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
    batch_size: int = 8,
) -> int:
    """Greedy outputs for ``split`` of ``shards_dir`` written to ``out_path`` (JSONL); returns the line count."""
    from pointvl.train.stage_setup import distributed_state

    state = distributed_state()
    cfg = model.config
    model.to(state.device)
    collate = Collator(tokenizer, image_processor, model.num_point_tokens, with_targets=False, pad_left=True)
    examples = ShardExamples(shards_dir, split, cfg.num_points, cfg.quant, shuffle=False)
    total = len(examples)
    rows: list[tuple[int, dict]] = []
    model.eval()
    greedy = greedy_config(tokenizer, max_new_tokens)  # explicit: nothing inherited from the checkpoint

    def decode(batch: list) -> None:
        inputs = {key: v.to(state.device) for key, v in collate([e for _, e in batch]).items()}
        ids = model.generate(**inputs, generation_config=greedy)
        for (p, e), out in zip(batch, ids, strict=True):
            text = tokenizer.decode(out, skip_special_tokens=True)
            rows.append((p, {"instance_id": e.instance_id, "qa_index": e.qa_index, "output": text}))
        logger.info("predict %d/%d on rank %d", len(rows), -(-total // state.num_processes), state.process_index)

    with torch.no_grad():
        batch = []
        for p, example in examples.iterate(keep=lambda p: p % state.num_processes == state.process_index):
            batch.append((p, example))
            if len(batch) == batch_size:
                decode(batch)
                batch = []
        if batch:
            decode(batch)
    if state.num_processes > 1:
        part = f"{out_path}.part-{state.process_index:05d}"
        pio.write_json(part, rows)
        state.wait_for_everyone()
        if state.is_main_process:
            parts = [f"{out_path}.part-{r:05d}" for r in range(state.num_processes)]
            rows = [tuple(r) for path in parts for r in pio.read_json(path)]
    if state.is_main_process:
        # record order; the category question last within a record (see the module docstring)
        order = {}
        for _, row in sorted(rows, key=lambda r: r[0]):
            order.setdefault(row["instance_id"], []).append(row)
        lines = [json.dumps(r, ensure_ascii=False) for group in order.values()
                 for r in sorted(group, key=lambda r: -r["qa_index"])]
        pio.write_bytes(out_path, ("\n".join(lines) + "\n").encode())
        if state.num_processes > 1:
            fs = pio.filesystem(out_path)[0]
            for path in parts:
                fs.rm(pio.filesystem(path)[1])
    state.wait_for_everyone()
    return total
