"""A Table-3 miniature on the CPU (``make table3-mini``): does GRPO learn here, and does routed credit help?

1. **Benchmark**: the project's own build (``pointvl.dataset.runner.build_in_process``, offline backends) on
   the procedural mini ShapeNet (``pointvl fixture``: ~36 good models, 9 categories) with
   ``--views`` views per model at ``--size`` pixels: a few hundred instances, a quarter of the models
   held out as the test split. ``--keypoints`` (4) keypoints per record, built and required by the
   rewards and the metric alike: with the paper's 16 the character-level tiny policy must write ~770
   tokens per answer, and 600 SFT steps left it writing broken JSON (every GRPO group zero-spread).
2. **Training**, per seed: the tiny policy (``tiny_preset``) trained by SFT once, then from that SFT
   checkpoint each second stage of Table 3: SFT budget-matched, GRPO broadcast, GRCA, GRCA + RPC
   (``pointvl.train.pipeline.train_stage``, all in one run folder per seed).
3. **Evaluation** on the held-out split (the category question's prompt of each record, greedy), scored by
   ``pointvl evaluate``'s code; the mean field reward of a record is the mean of IoU2D, IoU3D, KPA-2D, KPA-3D.
4. **Table**: every metric per variant, the mean over seeds and records with a 95 % bootstrap interval
   over the pooled (seed, record) pairs; each variant's mean field reward minus its SFT start, paired over
   the same (seed, record) pairs (interval and permutation p-value); the learning curves (``curves.png``).

``python -m benchmarks.table3_mini --out DIR [--seeds 0 1 2] [--grpo-steps 60] [--sft-steps 3000] ...``
writes ``DIR/table3.md``, ``DIR/table3.json`` and ``DIR/curves.png``; every stage resumes (a finished stage,
prediction or build is skipped), so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from pointvl.core import io as pio
from pointvl.evaluation.predictions import Prediction
from pointvl.evaluation.scoring import EvaluateConfig, aggregate, output_limit, score_records
from pointvl.evaluation.stats import bootstrap_interval, mean, paired_comparison
from pointvl.train.data import Collator, ShardExamples
from pointvl.train.generation import greedy_config
from pointvl.train.pipeline import load, train_stage
from pointvl.train.train_config import TrainConfig, tiny_preset

logger = logging.getLogger(__name__)

VARIANTS = ("sft", "sft_budget_matched", "broadcast", "grca", "grca_rpc")
STAGE = {"sft": "sft", "sft_budget_matched": "sft_budget_matched", "broadcast": "grpo_broadcast",
         "grca": "grpo_grca", "grca_rpc": "grpo_grca_rpc"}
GEOMETRY = ("iou2d", "iou3d", "kpa2d", "kpa3d", "rpc")


def build(out: str, views: int, size: int, keypoints: int) -> str:
    """The benchmark's shards under ``out/build`` (built once)."""
    from pointvl.dataset.build_config import BuildConfig
    from pointvl.dataset.runner import build_in_process
    from pointvl.fixture import write_fixture

    shapenet, run = pio.join(out, "shapenet"), pio.join(out, "build")
    shards = pio.join(run, "shards")
    if pio.exists(pio.join(shards, "README.md")):
        return shards
    if not pio.exists(pio.join(shapenet, "taxonomy.json")):
        write_fixture(shapenet, seed=0)
    config = BuildConfig.from_dict({
        "shard_size": 32,
        "clean": {"test_size": 0.25, "train_size": None},
        "sample_points": {"num_points": 1024},
        "render": {"width": size, "height": size, "views_per_model": views},
        "geometry": {"num_keypoints": keypoints},
        "kpts2d": {"k": keypoints},
    })
    build_in_process(shapenet, run, config)
    return shards


def config_for(variant: str, seed: int, args: argparse.Namespace) -> TrainConfig:
    cfg = tiny_preset(variant)
    return dataclasses.replace(
        cfg,
        sft=dataclasses.replace(cfg.sft, max_steps=args.sft_steps, seed=seed),
        grpo=dataclasses.replace(cfg.grpo, max_steps=args.grpo_steps, seed=seed, max_new_tokens=args.max_new_tokens,
                                 save_steps=max(args.grpo_steps, 1),
                                 grca=dataclasses.replace(cfg.grpo.grca, num_keypoints=args.keypoints)),
        eval_max_new_tokens=args.max_new_tokens,
    )


def predict_categories(checkpoint: str, config: TrainConfig, shards: str, out_path: str, limit: int | None) -> None:
    """Greedy outputs of the category-question prompt of each test record (``limit``: the first records)."""
    if pio.exists(out_path):
        return
    tokenizer, images, model = load(config, checkpoint)
    model.eval()
    collate = Collator(tokenizer, images, model.num_point_tokens, with_targets=False, pad_left=True)
    examples = [e for _, e in ShardExamples(shards, "test", config.model.num_points, config.model.quant,
                                            shuffle=False).iterate() if e.qa_index == 0][:limit]
    lines = []
    greedy = greedy_config(tokenizer, config.eval_max_new_tokens)  # as `pointvl predict`: nothing inherited
    with torch.no_grad():
        for i in range(0, len(examples), config.eval_batch_size):
            batch = examples[i: i + config.eval_batch_size]
            ids = model.generate(**collate(batch), generation_config=greedy)
            texts = [tokenizer.decode(o, skip_special_tokens=True) for o in ids]
            lines += [json.dumps({"instance_id": e.instance_id, "output": t})
                      for e, t in zip(batch, texts, strict=True)]
    pio.write_bytes(out_path, ("\n".join(lines) + "\n").encode())


def train_seed(shards: str, run: str, seed: int, args: argparse.Namespace) -> dict[str, str]:
    """Every variant's last checkpoint for one seed (SFT once, the other stages from its checkpoint)."""
    base = config_for("sft", seed, args)
    sft = train_stage(base, shards, run, "sft", None)
    out = {"sft": sft}
    for variant in VARIANTS[1:]:
        cfg = config_for(variant, seed, args)
        out[variant] = train_stage(cfg, shards, run, STAGE[variant], sft)
    return out


def field_rewards(rows: list[Any]) -> np.ndarray:
    """Per-record mean field reward (IoU2D, IoU3D, KPA-2D, KPA-3D)."""
    return np.array([np.mean([r.scores[k] for k in GEOMETRY[:4]]) for r in rows])


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    shards = build(args.out, args.views, args.size, args.keypoints)
    logger.info("benchmark built in %.0f s: %s", time.perf_counter() - t0, shards)
    scored: dict[str, list] = {v: [] for v in VARIANTS}
    for seed in args.seeds:
        run_dir = pio.join(args.out, f"seed{seed}")
        checkpoints = train_seed(shards, run_dir, seed, args)
        for variant, checkpoint in checkpoints.items():
            path = pio.join(run_dir, "eval", f"{variant}.jsonl")
            cfg = config_for(variant, seed, args)
            predict_categories(checkpoint, cfg, shards, path, args.eval_records)
            preds = {}
            for line in pio.read_bytes(path).decode().splitlines():
                row = json.loads(line)
                preds[row["instance_id"]] = Prediction(row["output"], None, output_limit(row["output"]))
            scoring = EvaluateConfig(num_keypoints=args.keypoints)  # the rewards' count (config_for)
            rows = [r for r in score_records(shards, preds, scoring) if r.status != "missing"]
            scored[variant] += rows
        logger.info("seed %d done (%.0f s)", seed, time.perf_counter() - t0)
    result: dict[str, Any] = {"seconds": time.perf_counter() - t0, "seeds": list(args.seeds), "variants": {}}
    sft_start = field_rewards(scored["sft"])
    for variant, rows in scored.items():
        metrics, _ = aggregate(rows, False)
        entry = {k: [metrics[k], bootstrap_interval(mean(np.array([r.scores[k] for r in rows])))] for k in GEOMETRY}
        fr = field_rewards(rows)
        entry["field_reward"] = [float(fr.mean()), bootstrap_interval(mean(fr))]
        entry["n"] = len(rows)
        entry["unparsable"] = sum(r.status == "unparsable" for r in rows)
        if variant != "sft":
            entry["vs_sft"] = paired_comparison(mean(fr), mean(sft_start))
        result["variants"][variant] = entry
    pio.write_json(pio.join(args.out, "table3.json"), result)
    pio.write_bytes(pio.join(args.out, "table3.md"), markdown(result).encode())
    curves([pio.join(args.out, f"seed{s}") for s in args.seeds], pio.join(args.out, "curves.png"))
    return result


def markdown(result: dict[str, Any]) -> str:
    head = ["Variant", "IoU2D", "IoU3D", "KPA-2D", "KPA-3D", "RPC", "field reward", "vs SFT (paired)", "p", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(v: list) -> str:
        return f"{v[0]:.3f} [{v[1][0]:.3f}, {v[1][1]:.3f}]"

    for variant, e in result["variants"].items():
        vs = e.get("vs_sft")
        lines.append("| " + " | ".join([
            variant, *(cell(e[k]) for k in GEOMETRY), cell(e["field_reward"]),
            f"{vs['difference']:+.3f} [{vs['interval'][0]:+.3f}, {vs['interval'][1]:+.3f}]" if vs else "–",
            f"{vs['p_value']:.3f}" if vs else "–", str(e["n"])]) + " |")
    return "\n".join(lines) + "\n"


def curves(run_dirs: list[str], path: str) -> None:
    """GRPO's mean field reward per step (each mode, every seed) and SFT's loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for run_dir in run_dirs:
        seed = os.path.basename(run_dir.rstrip("/"))
        sft = pio.read_json(pio.join(run_dir, "sft", "history.json"))
        axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft], label=seed)
        for mode in ("broadcast", "grca", "grca_rpc"):
            h = pio.read_json(pio.join(run_dir, f"grpo_{mode}", "history.json"))
            reward = [np.mean([r[f"reward_{f}"] for f in ("bbox2d", "bbox3d", "kpts2d", "kpts3d")]) for r in h]
            axes[1].plot([r["step"] for r in h], reward, label=f"{mode} {seed}")
    axes[0].set_title("SFT loss")
    axes[1].set_title("GRPO: mean field reward of the rollouts")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", type=int, default=8, help="views per model (8: ~290 instances)")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels")
    parser.add_argument("--keypoints", type=int, default=4,
                        help="keypoints per record, built and required (the paper's 16 make outputs too long here)")
    parser.add_argument("--sft-steps", type=int, default=3000,
                        help="300 steps (4 keypoints) still write broken JSON; ~0.09 s a step on an idle 2-core CPU")
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=600,
                        help="generation budget (canonical outputs with 4 keypoints: ~430 tiny-tokenizer tokens)")
    parser.add_argument("--eval-records", type=int, default=None, help="score only the first N test records")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    print(markdown(result))
    print(f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
