"""Stage 2, routed GRPO (paper §3.3-3.5): sample G outputs per prompt, score and route with GRCA, update.

One optimizer step per ``prompts_per_step`` prompts (per process):

1. **Rollouts.** For each prompt the current policy samples G completions (``temperature``, ``top_p``);
   a completion ends at its first ``<|im_end|>`` (kept, as background) or at ``max_new_tokens``.
2. **Scoring and routing.** The completions are decoded without special tokens; token character
   offsets come from re-tokenizing the decoded text when that gives back the same ids (exact), else
   from cumulative decoding (:func:`pointvl.grca.offsets_from_decode`). :func:`pointvl.grca.score_group`
   returns the routed token advantages for the mode (``broadcast``, ``grca``, ``grca_rpc``).
3. **Update.** Log-probabilities of the completion tokens under the current policy; the old-policy
   log-probabilities are the same values detached, because every rollout batch is used for exactly
   one optimizer step (TRL's GRPOTrainer does the same when ``num_iterations = 1``), so the ratio is 1
   in value and the clipped surrogate's gradient is ``A * grad log pi``; :func:`pointvl.grca.routed_grpo_loss`
   with ``beta = 0`` (no reference model).

Why not TRL's GRPOTrainer (pinned ``trl==1.16.0``): it accepts (B, T) advantages, but it forwards neither
point clouds nor our fused point tokens to generation and log-prob computation, so both of its model
calls would have to be overridden as well as the scoring; this loop on ``accelerate`` is shorter and keeps
every step visible. Time spent in each part is logged per step (``seconds_generate``, ``seconds_score``,
``seconds_update``) for the benchmark.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from pointvl.grca import offsets_from_decode, pad_token_advantages, routed_grpo_loss, score_group
from pointvl.train.config import GRPOTrainConfig
from pointvl.train.data import Collator, Example, ShardExamples
from pointvl.train.model import PointVL3D
from pointvl.train.sft import micro_batches

logger = logging.getLogger(__name__)


def token_offsets(tokenizer: Any, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Character offsets of ``ids`` in ``text`` (= their decoding without special tokens)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    plain = [i for i in ids if i not in tokenizer.all_special_ids]
    if enc.input_ids == plain and len(plain) == len(ids):
        return [tuple(o) for o in enc.offset_mapping]
    return offsets_from_decode(ids, lambda x: tokenizer.decode(x, skip_special_tokens=True))


def completion_lengths(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Length of each row up to and including its first ``eos_id`` (the full width if there is none)."""
    is_eos = ids == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, ids.shape[1])
    return first


def rollout(
    model: PointVL3D, tokenizer: Any, inputs: dict[str, torch.Tensor], example: Example, config: GRPOTrainConfig
) -> tuple[torch.Tensor, torch.Tensor, Any, float, float]:
    """G completions of one prompt: ids (G, T), mask (G, T), the GroupScore, generate and score seconds."""
    t0 = time.perf_counter()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = model.generate(
        **inputs, do_sample=True, temperature=config.temperature, top_p=config.top_p,
        max_new_tokens=config.max_new_tokens, num_return_sequences=config.num_generations,
    )
    lengths = completion_lengths(ids, eos)
    mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
    t1 = time.perf_counter()
    rows = [ids[i, : lengths[i]].tolist() for i in range(len(ids))]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    offsets = [token_offsets(tokenizer, r, s) for r, s in zip(rows, texts, strict=True)]
    score = score_group(texts, example.reward_target, example.camera, offsets, config.mode, config.lam, config.grca)
    return ids, mask, score, t1 - t0, time.perf_counter() - t1


def completion_logps(
    model: PointVL3D, inputs: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities (G, T) of the completion tokens ``ids`` after the prompt in ``inputs``."""
    g, t = ids.shape
    rep = {
        "input_ids": torch.cat([inputs["input_ids"].expand(g, -1), ids], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"].expand(g, -1), mask.long()], dim=1),
        "points": inputs["points"].expand(g, -1, -1),
        "pixel_values": inputs["pixel_values"].repeat(g, 1),
        "image_grid_thw": inputs["image_grid_thw"].repeat(g, 1),
    }
    logits = model(**rep, logits_to_keep=t + 1).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


def total_steps(num_prompts: int, config: GRPOTrainConfig, num_processes: int = 1) -> int:
    """Optimizer steps of one run (``max_steps`` if set, else ``epochs`` passes)."""
    per_step = config.prompts_per_step * num_processes
    return config.max_steps or max(1, math.ceil(config.epochs * num_prompts / per_step))


def run_grpo(
    model: PointVL3D, tokenizer: Any, image_processor: Any, shards_dir: str, config: GRPOTrainConfig
) -> list[dict[str, float]]:
    """Train ``model`` in place on the train split; returns one row of statistics per optimizer step."""
    try:
        from accelerate import Accelerator
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("GRPO needs `pip install pointvl[train]`") from e

    # 1. data, optimizer
    acc = Accelerator()
    torch.manual_seed(config.seed + acc.process_index)
    mcfg = model.config
    if mcfg.quant != config.grca.quant:
        raise ValueError("GRPOTrainConfig.grca.quant must equal ModelConfig.quant (the bins the model writes)")
    examples = ShardExamples(shards_dir, "train", mcfg.num_points, mcfg.quant, shuffle=True, seed=config.seed)
    total = total_steps(len(examples), config, acc.num_processes)
    collate = Collator(tokenizer, image_processor, model.num_point_tokens, with_targets=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    model, optimizer = acc.prepare(model, optimizer)
    policy = acc.unwrap_model(model)

    # 2. loop
    history: list[dict[str, float]] = []
    step = 0
    while step < total:
        for batch in micro_batches(examples, config.prompts_per_step, acc.process_index, acc.num_processes):
            start = time.perf_counter()
            stats = {"loss": 0.0, "seconds_generate": 0.0, "seconds_score": 0.0}
            rewards: list[dict[str, float]] = []
            for example in batch:
                inputs = {k: v.to(acc.device) for k, v in collate([example]).items()}
                policy.eval()
                ids, mask, score, t_gen, t_score = rollout(policy, tokenizer, inputs, example, config)
                policy.train()
                logp = completion_logps(model, inputs, ids, mask)
                adv = pad_token_advantages(score.token_advantages, ids.shape[1]).to(logp.device)
                loss = routed_grpo_loss(logp, logp.detach(), adv, mask, clip_eps=config.clip_eps)
                acc.backward(loss / len(batch))
                stats["loss"] += loss.item() / len(batch)
                stats["seconds_generate"] += t_gen
                stats["seconds_score"] += t_score
                rewards += [{**r, "format": float(all(f.valid for f in p.values()))}
                            for r, p in zip(score.rewards, score.parsed, strict=True)]
            acc.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            row = {"step": step, **stats, "seconds": time.perf_counter() - start}
            row["seconds_update"] = row["seconds"] - stats["seconds_generate"] - stats["seconds_score"]
            for key in rewards[0]:
                row[f"reward_{key}"] = sum(r[key] for r in rewards) / len(rewards)
            history.append(row)
            logger.info("grpo %d/%d loss %.4f format %.2f bbox3d %.3f (%.1fs, generate %.1fs)", step, total,
                        row["loss"], row["reward_format"], row["reward_bbox3d"], row["seconds"],
                        row["seconds_generate"])
            if step >= total:
                break
        examples.epoch += 1
    model.eval()
    return history
