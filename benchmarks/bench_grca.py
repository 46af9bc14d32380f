"""Benchmark: the cost of GRCA scoring next to one forward pass of a tiny policy (``make bench``).

Scores groups of 8 synthetic outputs (16 keypoints per field, tokenized by a byte-level BPE trained
in code) with ``score_group(mode="grca_rpc")`` and times one forward pass of a tiny Qwen2 causal LM
(2 layers, hidden 64, built from a config, random weights) on the same 8 sequences. The ratio shows
the routing overhead against the smallest model that could write these outputs; a real 3B policy's
forward pass is orders of magnitude slower, so the real ratio is far smaller.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from pointvl.core.extras import require
from pointvl.core.spatial import QuantConfig
from pointvl.grca import format_output, score_group

logger = logging.getLogger(__name__)

_WORDS = ("chair", "table", "lamp", "car", "sofa", "wooden", "metal", "red", "tall", "round", "with", "four",
          "legs", "a", "the", "back", "seat", "black", "glass", "small")


def sample_outputs(n: int, rng: np.random.Generator, width: int = 512, height: int = 512,
                   num_keypoints: int = 16, quant: QuantConfig | None = None) -> list[str]:
    """``n`` canonical outputs with random boxes, keypoints, answers and 8-16 word descriptions."""
    q = quant if quant is not None else QuantConfig()
    out = []
    for _ in range(n):
        lo2 = rng.uniform(0, 0.5, 2) * [width, height]
        hi2 = lo2 + rng.uniform(0.1, 0.5, 2) * [width, height]
        lo3 = rng.uniform(-0.9, 0.0, 3)
        hi3 = lo3 + rng.uniform(0.1, 0.9, 3)
        words = " ".join(rng.choice(_WORDS, size=int(rng.integers(8, 17))))
        out.append(format_output(
            str(rng.choice(_WORDS)), words, np.r_[lo2, hi2], np.r_[lo3, hi3],
            rng.uniform(lo2, hi2, (num_keypoints, 2)), rng.uniform(lo3, hi3, (num_keypoints, 3)),
            width, height, q,
        ))
    return out


def train_toy_tokenizer(texts: list[str], vocab_size: int = 300) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``, without pre-tokenizer splitting.

    Without the splitting regex, merges cross punctuation and digits, so tokens such as ``": [1`` or
    ``], [3`` occur: the hardest case for span routing. Decodes with the byte-level decoder.
    """
    require("tokenizers", extra="dev", purpose="the toy tokenizer")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def _tiny_forward_seconds(batch: int, length: int, vocab: int, repeats: int) -> tuple[float, int]:
    import torch

    require("transformers", extra="train", purpose="the bench's tiny model")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length + 8)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, vocab, (batch, length))
    with torch.no_grad():
        model(input_ids=ids)
        start = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids)
    return (time.perf_counter() - start) / repeats, sum(p.numel() for p in model.parameters())


def run(group_size: int = 8, repeats: int = 30, seed: int = 0) -> dict[str, float]:
    """Time ``score_group`` per output and a tiny model's forward pass of the group, with their ratio.

    Keys: ``tokens_per_output``, ``score_ms_per_output``, ``score_ms_per_group``,
    ``forward_ms_per_group`` (tiny Qwen2, batch = group), ``tiny_model_params`` and
    ``score_over_forward`` (group scoring time / group forward time).
    """
    rng = np.random.default_rng(seed)
    width = height = 512
    tok = train_toy_tokenizer(sample_outputs(200, rng, width, height))
    outputs = sample_outputs(group_size, rng, width, height)
    offsets = [tok.encode(o).offsets for o in outputs]
    f, cx = 600.0, width / 2
    camera = {"K": np.array([[f, 0, cx], [0, f, cx], [0, 0, 1.0]]), "R": np.eye(3),
              "t": np.array([0.0, 0.0, 2.5]), "width": width, "height": height}
    target = {"bbox2d": [100.0, 120.0, 400.0, 380.0], "bbox3d": [-0.5, -0.4, -0.3, 0.5, 0.4, 0.3],
              "answer": "chair"}
    score_group(outputs, target, camera, offsets)
    start = time.perf_counter()
    for _ in range(repeats):
        score_group(outputs, target, camera, offsets)
    per_group = (time.perf_counter() - start) / repeats
    length = max(len(o) for o in offsets)
    forward, params = _tiny_forward_seconds(group_size, length, tok.get_vocab_size(), max(3, repeats // 5))
    result = {
        "tokens_per_output": float(np.mean([len(o) for o in offsets])),
        "score_ms_per_output": 1e3 * per_group / group_size,
        "score_ms_per_group": 1e3 * per_group,
        "forward_ms_per_group": 1e3 * forward,
        "tiny_model_params": float(params),
        "score_over_forward": per_group / forward,
    }
    logger.info("GRCA bench: %s", result)
    return result
