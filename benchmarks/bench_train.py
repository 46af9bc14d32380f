"""Training throughput: SFT tokens/s, GRPO samples/s and the share of a GRPO step spent scoring + routing.

On CUDA: Qwen2.5-VL-3B's shapes and the PointLLM-sized Point-BERT with random weights (bf16 compute over
float32 master weights, gradient checkpointing, 8192 points, 448 x 448 images). On a CPU: the tiny preset,
in float32 and in the same bf16 mixed-precision mode. Also: the largest log-probability tensor of a GRPO
update at the paper's shapes, full-vocabulary vs chunked (:func:`pointvl.train.model.selective_logps`). The inputs are
synthetic records (random image and points, a canonical target). Random weights rarely emit
``<|im_end|>``, so every rollout runs to ``max_new_tokens``, and their outputs do not parse: the
scoring share of a rollout step is a lower bound; ``score_valid_ms`` times :func:`pointvl.grca.score_group`
on G parseable outputs instead. Run ``python -m benchmarks.bench_train``; prints one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time

import numpy as np
import torch

from pointvl.core.record import target_text
from pointvl.core.spatial import box3d_corners, project_box3d, project_points
from pointvl.grca import score_group
from pointvl.train.data import Collator, Example
from pointvl.train.grpo import completion_logps, rollout, token_offsets
from pointvl.train.model import build_image_processor, build_model, build_tokenizer
from pointvl.train.train_config import ModelConfig, tiny_preset

logger = logging.getLogger(__name__)


def synthetic_example(size: int, num_points: int, seed: int = 0) -> Example:
    """A record-shaped example with a consistent camera, boxes and 16 keypoints."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    half = rng.uniform(0.2, 0.5, size=3)
    box3d = np.concatenate([-half, half])
    K = np.array([[size, 0, size / 2], [0, size, size / 2], [0, 0, 1]], dtype=np.float64)
    R, t = np.eye(3), np.array([0.0, 0.0, 2.5])
    kpts3d = box3d_corners(box3d)[np.arange(16) % 8] * 0.9
    record = {
        "instance_id": f"bench-{seed}", "width": size, "height": size, "bbox2d": project_box3d(box3d, K, R, t),
        "bbox3d": box3d, "kpts2d": project_points(kpts3d, K, R, t), "kpts3d": kpts3d,
        "qa": json.dumps([{"question": "What is the object?", "choices": ["chair", "table"], "answer": "chair"}]),
        "description": "A chair with four legs, a square seat and a tall straight back.",
    }
    camera = {"K": K, "R": R, "t": t, "width": size, "height": size}
    target = {"bbox2d": record["bbox2d"], "bbox3d": box3d, "answer": "chair", "description": record["description"]}
    return Example(
        instance_id=record["instance_id"],
        image=Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)),
        points=rng.uniform(-half, half, size=(num_points, 3)).astype(np.float32),
        instruction="Look at the object in the image and its point cloud. What is the object? Choices: chair, table.",
        target=target_text(record, ModelConfig().quant),
        reward_target=target,
        camera=camera,
    )


def run() -> dict[str, object]:
    """One result per precision mode (CUDA: bf16 at the 3B shapes; CPU: the tiny preset in both modes)."""
    cuda = torch.cuda.is_available()
    vocab, chunk = 151936, tiny_preset().grpo.logprob_chunk
    results: dict[str, object] = {
        # GRPO update at G = 8, T = 1024, Qwen's vocabulary: the float32 logits a full log-softmax makes
        "logprob_full_fp32_gib": 8 * 1024 * vocab * 4 / 2**30,
        "logprob_chunked_fp32_gib": chunk * vocab * 4 / 2**30,
    }
    for dtype in ("bfloat16",) if cuda else ("float32", "bfloat16"):
        results[dtype] = run_mode(dtype)
    return results


def run_mode(dtype: str) -> dict[str, float]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = tiny_preset()
    if cuda:
        mcfg = ModelConfig(architecture="3b", random_init=True, dtype=dtype)
        batch_size, grpo = 4, dataclasses.replace(tiny.grpo, num_generations=8, max_new_tokens=256)
        torch.cuda.reset_peak_memory_stats()
    else:
        mcfg = dataclasses.replace(tiny.model, dtype=dtype)
        batch_size, grpo = 2, dataclasses.replace(tiny.grpo, num_generations=8, max_new_tokens=64)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(mcfg)
    with device:
        model = build_model(mcfg, tokenizer)
    images = build_image_processor(mcfg)
    examples = [synthetic_example(mcfg.image_size, mcfg.num_points, seed=i) for i in range(batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # 1. SFT: forward + backward + AdamW step on one batch (1 warm-up step, 3 timed)
    batch = {k: v.to(device) for k, v in Collator(tokenizer, images, model.num_point_tokens, True)(examples).items()}
    model.train()
    times = []
    for _ in range(4):
        sync()
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sync()
        times.append(time.perf_counter() - t0)
    tokens = float(batch["attention_mask"].sum())

    # 2. GRPO: rollout of G samples, scoring/routing, log-probs + backward + step (1 warm-up, 2 timed)
    prompt_batch = Collator(tokenizer, images, model.num_point_tokens, False)(examples[:1])
    prompt = {k: v.to(device) for k, v in prompt_batch.items()}
    steps = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        model.eval()
        ids, mask, score, t_gen, t_score = rollout(model, tokenizer, prompt, examples[0], grpo)
        model.train()
        from pointvl.grca import pad_token_advantages, routed_grpo_loss

        logp = completion_logps(model, prompt, ids, mask, grpo.logprob_chunk, grpo.temperature)
        adv = pad_token_advantages(score.token_advantages, ids.shape[1]).to(device)
        routed_grpo_loss(logp, logp.detach(), adv, mask).backward()
        optimizer.step()
        optimizer.zero_grad()
        sync()
        steps.append((time.perf_counter() - t0, t_gen, t_score))
    step_s = float(np.mean([s[0] for s in steps[1:]]))

    # 3. scoring + routing on G parseable outputs
    outputs = [examples[0].target] * grpo.num_generations
    ids_valid = [tokenizer(o, add_special_tokens=False).input_ids for o in outputs]
    t0 = time.perf_counter()
    offsets = [token_offsets(tokenizer, i, o) for i, o in zip(ids_valid, outputs, strict=True)]
    score_group(outputs, examples[0].reward_target, examples[0].camera, offsets, grpo.mode, grpo.lam, grpo.grca)
    score_valid = time.perf_counter() - t0

    return {
        "device": 1.0 if cuda else 0.0,
        "sft_tokens_per_s": tokens / float(np.mean(times[1:])),
        "sft_step_s": float(np.mean(times[1:])),
        "sft_batch_tokens": tokens,
        "grpo_samples_per_s": grpo.num_generations / step_s,
        "grpo_step_s": step_s,
        "grpo_generate_share": float(np.mean([s[1] for s in steps[1:]])) / step_s,
        "grpo_score_route_share": float(np.mean([s[2] for s in steps[1:]])) / step_s,
        "score_valid_ms": 1000 * score_valid,
        "score_valid_share": score_valid / step_s,
        "grpo_new_tokens": float(ids.shape[1]),
        "grpo_update_share": 1 - float(np.mean([(s[1] + s[2]) for s in steps[1:]])) / step_s,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # the process so far
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(), indent=2))
