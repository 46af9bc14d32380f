"""A Table-3 miniature on the CPU (``make table3-mini``): does GRPO learn here, and does routed credit help?

1. **Benchmark**: the project's own build (``pointvl.dataset.runner.build_in_process``, offline backends) on
   the procedural mini ShapeNet (``pointvl fixture``: ~36 good models, 9 categories) with
   ``--views`` views per model at ``--size`` pixels: a few hundred instances, a quarter of the models
   held out as the test split (72 records). ``--keypoints`` (4) keypoints per record, built and required
   by the rewards and the metric alike: with the paper's 16 the character-level tiny policy must write ~770
   tokens per answer, and 600 SFT steps left it writing broken JSON (every GRPO group zero-spread).
2. **Training**, per seed: the tiny policy (``tiny_preset``) trained by SFT once, then from that SFT
   checkpoint each second stage of Table 3: SFT budget-matched, GRPO broadcast, GRCA, GRCA + RPC
   (``pointvl.train.pipeline.train_stage``). GRPO: 4 prompts x 8 rollouts a step at temperature 0.5, AdamW
   1e-4, 60 steps (one prompt x 4 rollouts a step did not move the held-out reward: noise; at temperature 1
   half the SFT policy's samples are broken JSON). ``--workers`` stages run at once, one thread each.
3. **Evaluation** on the held-out split (the category question's prompt of each record, greedy), scored by
   ``pointvl evaluate``'s code; the mean field reward of a record is the mean of IoU2D, IoU3D, KPA-2D, KPA-3D.
4. **Table**: every metric per variant, the mean over seeds and records with a 95 % bootstrap interval
   over the pooled (seed, record) pairs; each variant's mean field reward minus its SFT start, paired over
   the same (seed, record) pairs (interval and permutation p-value); the GRPO modes compared pairwise, with
   the records an interval excluding 0 would need at the measured difference; the learning curves
   (``curves.png``).

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
from pointvl.core.errors import InputError
from pointvl.evaluation.predictions import read_predictions
from pointvl.evaluation.scoring import EvaluateConfig, RecordScore, aggregate, intervals, score_records
from pointvl.evaluation.stats import bootstrap_interval, mean, paired_comparison
from pointvl.train import checkpoint as ckpt
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
                                 prompts_per_step=args.prompts_per_step, num_generations=args.generations,
                                 learning_rate=args.grpo_lr, temperature=args.temperature,
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


def stage_job(shards: str, seed_dir: str, seed: int, variant: str, args: argparse.Namespace) -> None:
    """Train one variant of one seed and predict the held-out split with it (``SEED_DIR/eval/<variant>.jsonl``);
    a finished stage or prediction is skipped on a re-run.

    SFT runs in ``SEED_DIR``; every other variant starts from its last checkpoint in a run folder of its own
    (``SEED_DIR/<variant>``), so that stages running at once never write the same ``compute.json``."""
    cfg = config_for(variant, seed, args)
    if variant == "sft":
        checkpoint = train_stage(cfg, shards, seed_dir, "sft", None)
    else:
        sft = ckpt.latest_checkpoint(pio.join(seed_dir, "sft"))
        if sft is None:
            raise InputError(f"{seed_dir}/sft has no checkpoint: the seed's SFT must finish before {variant}")
        checkpoint = train_stage(cfg, shards, pio.join(seed_dir, variant), STAGE[variant], sft)
    predict_categories(checkpoint, cfg, shards, pio.join(seed_dir, "eval", f"{variant}.jsonl"), args.eval_records)


def _worker_setup() -> None:
    # one intra-op thread per worker: two single-threaded tiny-model runs on 2 cores take about as long each
    # as one run with 2 threads (generation is per-token Python overhead, not arithmetic)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def train_all(shards: str, args: argparse.Namespace) -> None:
    """Every (seed, variant) stage on ``args.workers`` processes: each seed's SFT first, then, as soon as it is
    done, that seed's four second stages (SFT of the other seeds keeps its place in the queue)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    seed_dirs = {seed: pio.join(args.out, f"seed{seed}") for seed in args.seeds}
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_setup) as pool:
        pending = {pool.submit(stage_job, shards, seed_dirs[s], s, "sft", args): (s, "sft") for s in args.seeds}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                seed, variant = pending.pop(future)
                if future.exception() is not None:  # a failed stage stops the benchmark with its own error,
                    pool.shutdown(cancel_futures=True)  # without first running every queued stage
                    raise future.exception()
                logger.info("seed %d %s done", seed, variant)
                if variant == "sft":
                    for v in VARIANTS[1:]:
                        pending[pool.submit(stage_job, shards, seed_dirs[seed], seed, v, args)] = (seed, v)


def field_rewards(rows: list[RecordScore]) -> np.ndarray:
    """Per-record mean field reward (IoU2D, IoU3D, KPA-2D, KPA-3D)."""
    return np.array([np.mean([r.scores[k] for k in GEOMETRY[:4]]) for r in rows])


def scored_rows(shards: str, path: str, scoring: EvaluateConfig) -> list[RecordScore]:
    """``pointvl evaluate``'s per-record scores of one prediction file (the records it predicted)."""
    return [r for r in score_records(shards, read_predictions(path), scoring) if r.status != "missing"]


def records_needed(comparison: dict[str, Any], n: int) -> int | None:
    """Paired (seed, record) pairs for an interval of this half-width-to-difference ratio to exclude 0 (the
    half-width shrinks as 1/sqrt(n)); None when the difference is 0. It resamples records, not seeds, so it
    ignores the variation between seeds (the per-seed table shows it)."""
    lo, hi = comparison["interval"]
    d = comparison["difference"]
    return None if d == 0 else int(np.ceil(n * ((hi - lo) / 2 / abs(d)) ** 2))


def check_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings (``OUT/settings.json``, written by the first run): a re-run resumes only with the
    same ones, since finished stages are reused as they are."""
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workers")}
    path = pio.join(args.out, "settings.json")
    if pio.exists(path):
        before = pio.read_json(path)
        changed = sorted(k for k in settings if k != "seeds" and before.get(k) != settings[k])
        if changed:
            was = ", ".join(f"{k}={before.get(k)}" for k in changed)
            raise InputError(f"{args.out} was run with other settings ({was}): its finished stages would be "
                             "reused; use another --out")
    pio.write_json(path, settings)
    return settings


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    args.seeds = sorted(set(args.seeds))
    settings = check_settings(args)
    shards = build(args.out, args.views, args.size, args.keypoints)
    logger.info("benchmark built in %.0f s: %s", time.perf_counter() - t0, shards)
    train_all(shards, args)
    grca = config_for("grca_rpc", 0, args).grpo.grca  # the rewards' verifier options, so metric = reward
    scoring = EvaluateConfig(quant=grca.quant, num_keypoints=grca.num_keypoints, keypoint_spread=grca.keypoint_spread)
    scored: dict[str, list[RecordScore]] = {v: [] for v in VARIANTS}
    per_seed: dict[str, list[float]] = {v: [] for v in VARIANTS}
    stage_seconds = 0.0
    for seed in args.seeds:
        seed_dir = pio.join(args.out, f"seed{seed}")
        ids = None
        for variant in VARIANTS:
            rows = scored_rows(shards, pio.join(seed_dir, "eval", f"{variant}.jsonl"), scoring)
            if ids is None:
                ids = [r.instance_id for r in rows]
            if [r.instance_id for r in rows] != ids:  # comparisons pair the k-th rows of two variants
                raise InputError(f"{seed_dir}/eval/{variant}.jsonl predicts other records than sft.jsonl")
            scored[variant] += rows
            per_seed[variant].append(float(field_rewards(rows).mean()))
            run_dir = seed_dir if variant == "sft" else pio.join(seed_dir, variant)
            stage_seconds += sum(r["seconds"] for r in pio.read_json(pio.join(run_dir, "compute.json")))
    result: dict[str, Any] = {
        "seconds": time.perf_counter() - t0,  # this invocation's wall time (a resumed run skips what is finished)
        "stage_seconds": stage_seconds,  # every stage's training time, summed (its compute.json)
        "seeds": list(args.seeds), "settings": settings, "variants": {}, "between_modes": {}, "per_seed": per_seed}
    rewards = {v: mean(field_rewards(rows)) for v, rows in scored.items()}
    for variant, rows in scored.items():
        metrics, _ = aggregate(rows, False)
        bounds = intervals(rows, False)
        entry = {k: [metrics[k], bounds[k]] for k in GEOMETRY}
        entry["field_reward"] = [float(rewards[variant]()), bootstrap_interval(rewards[variant])]
        entry["n"] = len(rows)
        entry["unparsable"] = sum(r.status == "unparsable" for r in rows)
        if variant != "sft":
            entry["vs_sft"] = paired_comparison(rewards[variant], rewards["sft"])
        result["variants"][variant] = entry
    for a, b in (("grca", "broadcast"), ("grca_rpc", "broadcast"), ("grca_rpc", "grca"), ("broadcast",
                                                                                          "sft_budget_matched")):
        comparison = paired_comparison(rewards[a], rewards[b])
        comparison["records_needed"] = records_needed(comparison, len(scored[a]))
        result["between_modes"][f"{a} - {b}"] = comparison
    pio.write_json(pio.join(args.out, "table3.json"), result)
    pio.write_bytes(pio.join(args.out, "table3.md"), markdown(result).encode())
    curves([pio.join(args.out, f"seed{s}") for s in args.seeds], pio.join(args.out, "curves.png"))
    return result


def markdown(result: dict[str, Any]) -> str:
    head = ["Variant", "IoU2D", "IoU3D", "KPA-2D", "KPA-3D", "RPC", "field reward", "vs SFT (paired)", "p", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(v: list) -> str:
        return f"{v[0]:.3f} [{v[1][0]:.3f}, {v[1][1]:.3f}]"

    def diff(c: dict) -> str:
        return f"{c['difference']:+.3f} [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}]"

    for variant, e in result["variants"].items():
        vs = e.get("vs_sft")
        lines.append("| " + " | ".join([
            variant, *(cell(e[k]) for k in GEOMETRY), cell(e["field_reward"]), diff(vs) if vs else "–",
            f"{vs['p_value']:.3f}" if vs else "–", str(e["n"])]) + " |")
    lines += ["", "| Comparison (mean field reward, paired) | difference [95 % interval] | p | (seed, record) pairs "
              "for an interval excluding 0 at this difference |", "|---|---|---|---|"]
    for name, c in result["between_modes"].items():
        lines.append(f"| {name} | {diff(c)} | {c['p_value']:.3f} | {c['records_needed']} |")
    seeds = result["seeds"]
    sft = result["per_seed"]["sft"]
    lines += ["", "| Mean field reward per seed (minus SFT's) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for variant, values in result["per_seed"].items():
        cells = [f"{v:.3f}" if variant == "sft" else f"{v:.3f} ({v - b:+.3f})"
                 for v, b in zip(values, sft, strict=True)]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def moving_average(values: list[float] | np.ndarray, window: int) -> np.ndarray:
    v = np.asarray(values, np.float64)
    return np.array([v[max(0, i - window + 1): i + 1].mean() for i in range(len(v))])


def curves(seed_dirs: list[str], path: str) -> None:
    """SFT's loss per seed and, per GRPO mode, the rollouts' mean field reward per step (mean over seeds,
    moving average of 5 steps; thin lines: each seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for seed_dir in seed_dirs:
        sft = pio.read_json(pio.join(seed_dir, "sft", "history.json"))
        axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft], label=os.path.basename(seed_dir.rstrip("/")))
    for mode, color in (("broadcast", "tab:blue"), ("grca", "tab:orange"), ("grca_rpc", "tab:green")):
        per_seed = []
        for seed_dir in seed_dirs:
            h = pio.read_json(pio.join(seed_dir, mode, f"grpo_{mode}", "history.json"))
            per_seed.append([np.mean([r[f"reward_{f}"] for f in ("bbox2d", "bbox3d", "kpts2d", "kpts3d")]) for r in h])
            axes[1].plot(range(1, len(h) + 1), moving_average(per_seed[-1], 5), color=color, alpha=0.25, lw=0.8)
        steps = min(len(r) for r in per_seed)
        axes[1].plot(range(1, steps + 1), moving_average(np.mean([r[:steps] for r in per_seed], axis=0), 5),
                     color=color, label=mode)
    axes[0].set_title("SFT loss")
    axes[1].set_title("GRPO: rollouts' mean field reward (5-step mean)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
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
    parser.add_argument("--prompts-per-step", type=int, default=4, help="GRPO prompts per optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="GRPO group size G")
    parser.add_argument("--grpo-lr", type=float, default=1e-4, help="GRPO AdamW rate (1e-3 collapsed the policy)")
    parser.add_argument("--temperature", type=float, default=0.5,
                        help="rollouts' temperature (at 1, half of the SFT policy's samples are broken JSON)")
    parser.add_argument("--workers", type=int, default=2, help="stages trained at once, one thread each")
    parser.add_argument("--max-new-tokens", type=int, default=600,
                        help="generation budget (canonical outputs with 4 keypoints: ~430 tiny-tokenizer tokens)")
    parser.add_argument("--eval-records", type=int, default=None, help="score only the first N test records")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        result = run(args)
    except InputError as err:
        raise SystemExit(f"table3_mini: {err}") from None
    print(markdown(result))
    print(f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
