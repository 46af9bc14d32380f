"""Stage 2, routed GRPO (paper §3.3-3.5): sample G outputs per prompt, score and route with GRCA, update.

One optimizer step per ``prompts_per_step`` prompts (over all processes, split evenly across ranks):

1. **Rollouts.** For each prompt the current policy samples G completions with an explicit
   ``GenerationConfig`` (``temperature``, ``top_p``, ``top_k`` of the config, no repetition penalty:
   :mod:`pointvl.train.generation`); a completion ends at its first ``<|im_end|>`` (kept, as background)
   or at ``max_new_tokens``.
2. **Scoring and routing.** The completions are decoded without special tokens; token character
   offsets come from re-tokenizing the decoded text when that gives back the same ids (exact), else
   from cumulative decoding (:func:`pointvl.grca.offsets_from_decode`). :func:`pointvl.grca.score_group`
   returns the routed token advantages for the mode (``broadcast``, ``grca``, ``grca_rpc``).
3. **Update.** Log-probabilities of the completion tokens under the current policy; the old-policy
   log-probabilities are the same values detached, because every rollout batch is used for exactly
   one optimizer step (TRL's GRPOTrainer does the same when ``num_iterations = 1``), so the ratio is 1
   in value and the clipped surrogate's gradient is ``A * grad log pi``; :func:`pointvl.grca.routed_grpo_loss`
   with ``beta = 0`` (no reference model) and ``grpo.loss_type``'s normalisation (TRL's ``grpo``, ``dapo``,
   ``dr_grpo``). A step's rollouts all come before its updates, so that ``dapo`` can divide by the step's
   completion tokens over all processes, as TRL's ``num_items_in_batch``.
4. **Diagnostics** (:func:`step_diagnostics`, in each ``history.json`` row and the log line): per field
   (and RPC) the reward's mean and std over the step's completions, the share of groups with zero spread
   (all G completions scored the same: no signal for that field), the share of completions cut at
   ``max_new_tokens`` (a warning above 10 %) and of unparsable ones, and the clip fraction.

Why not TRL's GRPOTrainer (pinned ``trl==1.16.0``): it accepts (B, T) advantages, but it forwards neither
point clouds nor our fused point tokens to generation and log-prob computation, so both of its model
calls would have to be overridden as well as the scoring; this loop on ``accelerate`` is shorter and keeps
every step visible. Time spent in each part is logged per step (``seconds_generate``, ``seconds_score``,
summed over ranks; ``seconds_update``), with the completions trained on (``samples``) and the tokens
generated, so the variants' compute can be compared.

Rollouts use transformers ``generate`` (:func:`rollout` is the engine's interface: prompt inputs in, G
completions out). A vLLM engine (``grpo.rollout_engine="vllm"``: weights synced after each optimizer
step, the point tokens passed as prompt embeddings) is named in the config but not built: it needs a
GPU, which this work did not have; preflight refuses it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from pointvl.grca import (
    GEOMETRIC_FIELDS,
    clip_fraction,
    offsets_from_decode,
    pad_token_advantages,
    routed_grpo_loss,
    score_group,
)
from pointvl.train import checkpoint as ckpt
from pointvl.train.data import Example
from pointvl.train.generation import sampling_config, stop_token_id
from pointvl.train.model import PointVL3D
from pointvl.train.stage_setup import StepCallback, make_accelerator, num_processes, start_stage, trainer_state
from pointvl.train.train_config import GRPOTrainConfig

logger = logging.getLogger(__name__)

DIAGNOSED_FIELDS: tuple[str, ...] = (*GEOMETRIC_FIELDS, "rpc")
DIAGNOSTIC_SUMS: tuple[str, ...] = (
    *(f"zero_spread_{f}" for f in DIAGNOSED_FIELDS), *(f"squared_reward_{f}" for f in DIAGNOSED_FIELDS),
    "truncated", "unparsable", "clipped_tokens",
)
TRUNCATION_WARNING = 0.10
"""A step logs a warning when more than this share of its completions was cut at ``max_new_tokens``."""


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


@contextlib.contextmanager
def gathered_for_generation(acc: Any, model: Any) -> Iterator[PointVL3D]:
    """The policy with its full weights for the length of a rollout: gathered once, not per layer per token.

    ZeRO-3: every parameter is gathered and DeepSpeed's per-module hooks are lifted while generating
    (TRL's hook helpers, as its ``unwrap_model_for_generation`` does); FSDP2: every FSDP module is
    unsharded and kept so until the rollout ends; DDP and one process: the plain module.
    """
    policy = acc.unwrap_model(model)
    if acc.distributed_type.value == "DEEPSPEED" and model.zero_optimization_stage() == 3:
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            remove_hooks(model)
            try:
                yield policy
            finally:
                add_hooks(model)
        return
    if acc.distributed_type.value == "FSDP":
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield policy
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)
        return
    yield policy


def rollout(
    model: PointVL3D, tokenizer: Any, inputs: dict[str, torch.Tensor], example: Example, config: GRPOTrainConfig,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Any, float, float]:
    """G completions of one prompt: ids (G, T), mask (G, T), the GroupScore, generate and score seconds.

    ``seed`` (when given) seeds the sampling, so a group does not depend on what ran before it.
    """
    t0 = time.perf_counter()
    eos = stop_token_id(tokenizer)
    sampling = sampling_config(tokenizer, config.max_new_tokens, config.num_generations, config.temperature,
                               config.top_p, config.top_k)
    if seed is not None:
        torch.manual_seed(seed)
    ids = model.generate(**inputs, generation_config=sampling)
    lengths = completion_lengths(ids, eos)
    mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
    t1 = time.perf_counter()
    rows = [ids[i, : lengths[i]].tolist() for i in range(len(ids))]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    offsets = [token_offsets(tokenizer, r, s) for r, s in zip(rows, texts, strict=True)]
    score = score_group(texts, example.reward_target, example.camera, offsets, config.mode, config.lam, config.grca)
    return ids, mask, score, t1 - t0, time.perf_counter() - t1


def completion_logps(
    model: PointVL3D, inputs: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, chunk: int,
    temperature: float,
) -> torch.Tensor:
    """Log-probabilities (G, T) of the completion tokens ``ids`` after the prompt in ``inputs`` (selective,
    ``chunk`` tokens at a time: no (G, T, vocab) float32 tensor) under the policy at ``temperature``: the
    distribution the rollouts were sampled from, so the trained ratio is that of the sampled tokens."""
    g = ids.shape[0]
    rep = {
        "input_ids": torch.cat([inputs["input_ids"].expand(g, -1), ids], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"].expand(g, -1), mask.long()], dim=1),
        "points": inputs["points"].expand(g, -1, -1),
        "pixel_values": inputs["pixel_values"].repeat(g, 1),
        "image_grid_thw": inputs["image_grid_thw"].repeat(g, 1),
    }
    return model(**rep, logps_of=ids, logps_chunk=chunk, logps_temperature=temperature)


def group_diagnostics(score: Any, ids: torch.Tensor, eos_id: int) -> dict[str, float]:
    """Sums over one group's G completions, for :func:`step_diagnostics`: groups whose reward of a field has
    zero spread (every completion scored the same: no learning signal for that field), squared rewards,
    completions without ``eos_id`` (cut at ``max_new_tokens``) and completions in which no field parses."""
    out = {}
    for f in DIAGNOSED_FIELDS:
        r = [x[f] for x in score.rewards]
        out[f"zero_spread_{f}"] = float(max(r) == min(r))
        out[f"squared_reward_{f}"] = sum(v * v for v in r)
    out["truncated"] = float((~(ids == eos_id).any(dim=1)).sum())
    out["unparsable"] = float(sum(not any(f.valid for f in p.values()) for p in score.parsed))
    return out


def step_diagnostics(row: dict[str, float], prompts: int, group_size: int) -> dict[str, float]:
    """The step's diagnostics from the summed ``row`` (its squared sums and counts are removed from it):
    ``reward_<f>_std`` (over the step's completions), ``zero_spread_<f>`` (share of groups), ``truncated`` and
    ``unparsable`` (share of completions) and ``clip_fraction`` (share of tokens, TRL's ``clip_ratio/region_mean``)."""
    n = prompts * group_size
    out = {}
    for f in DIAGNOSED_FIELDS:
        mean_sq = row.pop(f"squared_reward_{f}") / n
        out[f"reward_{f}_std"] = math.sqrt(max(mean_sq - row[f"reward_{f}"] ** 2, 0.0))
        out[f"zero_spread_{f}"] = row.pop(f"zero_spread_{f}") / prompts
    out["truncated"] = row.pop("truncated") / n
    out["unparsable"] = row.pop("unparsable") / n
    out["clip_fraction"] = row.pop("clipped_tokens") / max(row["generated_tokens"], 1.0)
    return out


def total_steps(num_prompts: int, config: GRPOTrainConfig) -> int:
    """Optimizer steps of one run (``max_steps`` if set, else ``epochs`` passes of ``prompts_per_step``)."""
    return config.max_steps or max(1, math.ceil(config.epochs * num_prompts / config.prompts_per_step))


def trained_samples(num_prompts: int, config: GRPOTrainConfig) -> int:
    """Completions the stage trains on (G per prompt): the budget of the SFT budget-matched baseline."""
    return total_steps(num_prompts, config) * config.prompts_per_step * config.num_generations


def run_grpo(
    model: PointVL3D, tokenizer: Any, image_processor: Any, shards_dir: str, config: GRPOTrainConfig,
    stage_dir: str | None = None, on_step: StepCallback | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place on the train split; returns one row of statistics per optimizer step (the
    whole run's). With ``stage_dir``: checkpoints every ``save_steps`` and resume from the latest;
    ``on_step(step, total, row)`` after each step (progress for whoever runs it).

    Step ``s`` trains on the prompts at stream positions ``[s * Q, (s + 1) * Q)`` (``Q = prompts_per_step``);
    prompt ``p`` goes to rank ``p % processes`` and is sampled with seed ``(seed, p)``, so the samples and
    the averaged gradient do not depend on the process count.
    """
    # 1. the batch relations, the accelerator; data, optimizer, resume as every stage (stage_setup.start_stage)
    processes = num_processes()
    if config.prompts_per_step % processes:
        raise ValueError(f"GRPOTrainConfig.prompts_per_step ({config.prompts_per_step}) must be a multiple of "
                         f"the process count ({processes})")
    per_rank = config.prompts_per_step // processes
    acc = make_accelerator(per_rank, 1, config.max_grad_norm)
    if model.config.quant != config.grca.quant:
        raise ValueError("GRPOTrainConfig.grca.quant must equal ModelConfig.quant (the bins the model writes)")
    stage = start_stage(acc, model, tokenizer, image_processor, shards_dir, config, stage_dir,
                        steps=lambda n: total_steps(n, config), with_targets=False, weight_decay=0.0,
                        # constant (paper: none stated)
                        schedule=lambda optimizer, _: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
    model, optimizer, scheduler, params = stage.model, stage.optimizer, stage.scheduler, stage.params
    examples, collate, n, total, step, history = (stage.examples, stage.collate, stage.n, stage.total, stage.step,
                                                  stage.history)

    # 2. loop
    rank, q = acc.process_index, config.prompts_per_step
    stream = examples.stream(step * q, keep=lambda p: p % processes == rank)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    while step < total:
        start = time.perf_counter()
        local = {"loss": 0.0, "seconds_generate": 0.0, "seconds_score": 0.0, "generated_tokens": 0.0, "tokens": 0.0,
                 **dict.fromkeys(DIAGNOSTIC_SUMS, 0.0)}
        rollout_seconds = 0.0
        rewards: list[dict[str, float]] = []
        groups = []
        for _ in range(per_rank):  # every rollout of the step first: dapo divides by the step's token count
            position, example = next(stream)
            inputs = {k: v.to(acc.device) for k, v in collate([example]).items()}
            model.eval()
            with gathered_for_generation(acc, model) as policy:
                ids, mask, score, t_gen, t_score = rollout(policy, tokenizer, inputs, example, config,
                                                           seed=config.seed * 1_000_003 + position)
            model.train()
            groups.append((inputs, ids, mask, score))
            local["seconds_generate"] += t_gen
            local["seconds_score"] += t_score
            rollout_seconds += t_gen + t_score
            local["generated_tokens"] += float(mask.sum())
            local["tokens"] += float(mask.sum()) + len(ids) * inputs["input_ids"].shape[1]  # forward/backward
            for k, v in group_diagnostics(score, ids, eos).items():
                local[k] += v
            rewards += [{**r, "format": float(all(f.valid for f in p.values()))}
                        for r, p in zip(score.rewards, score.parsed, strict=True)]
        step_tokens = acc.reduce(torch.tensor([local["generated_tokens"]], dtype=torch.float64, device=acc.device),
                                 "sum").item()
        for inputs, ids, mask, score in groups:
            with acc.accumulate(model):
                logp = completion_logps(model, inputs, ids, mask, config.logprob_chunk, config.temperature)
                adv = pad_token_advantages(score.token_advantages, ids.shape[1]).to(logp.device)
                # backward averages over the q = processes x per_rank groups: num_items is the step's tokens / q
                loss = routed_grpo_loss(logp, logp.detach(), adv, mask, clip_eps=config.clip_eps,
                                        loss_type=config.loss_type, max_completion_length=config.max_new_tokens,
                                        num_items=max(step_tokens, 1.0) / q)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            local["loss"] += loss.item()
            local["clipped_tokens"] += clip_fraction(logp, logp, adv, mask, config.clip_eps) * float(mask.sum())
        reward_keys = sorted(rewards[0])
        values = [local[k] for k in local] + [sum(r[k] for r in rewards) for k in reward_keys]
        summed = acc.reduce(torch.tensor(values, dtype=torch.float64, device=acc.device), "sum").tolist()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        row = {"step": step, "learning_rate": lr, "samples": step * q * config.num_generations}
        row.update(dict(zip(local, summed[: len(local)], strict=True)))
        row["loss"] /= q
        row.update({f"reward_{k}": v / (q * config.num_generations)
                    for k, v in zip(reward_keys, summed[len(local):], strict=True)})
        row.update(step_diagnostics(row, q, config.num_generations))
        row["seconds"] = time.perf_counter() - start
        row["seconds_update"] = row["seconds"] - rollout_seconds  # this rank's
        history.append(row)
        logger.info("grpo %d/%d loss %.4f format %.2f bbox3d %.3f (%.1fs, generate %.1fs) truncated %.0f%% "
                    "unparsable %.0f%% clipped %.0f%% zero-spread groups %s", step, total, row["loss"],
                    row["reward_format"], row["reward_bbox3d"], row["seconds"], row["seconds_generate"],
                    100 * row["truncated"], 100 * row["unparsable"], 100 * row["clip_fraction"],
                    " ".join(f"{f} {row[f'zero_spread_{f}']:.2f}" for f in DIAGNOSED_FIELDS))
        if on_step is not None:
            on_step(step, total, row)
        if row["truncated"] > TRUNCATION_WARNING:
            logger.warning("grpo %d/%d: %.0f%% of the completions were cut at max_new_tokens=%d (over %.0f%%): "
                           "their fields are missing and score 0; raise grpo.max_new_tokens", step, total,
                           100 * row["truncated"], config.max_new_tokens, 100 * TRUNCATION_WARNING)
        if stage_dir and (step % config.save_steps == 0 or step == total):
            ckpt.save_checkpoint(acc, model, optimizer, scheduler, tokenizer, stage_dir,
                                 trainer_state(step, total, history, step * q, config, n), config.save_total_limit)
    model.eval()
    return history
