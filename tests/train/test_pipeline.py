"""The training flow's stages on a run folder: checkpoints, metrics, curves, resume, config guard."""

import dataclasses
import os

import pytest

from pointvl.core import io as pio
from pointvl.evaluation.scoring import METRIC_KEYS
from pointvl.train.pipeline import format_compute, run_pipeline
from pointvl.train.train_config import tiny_preset


def _config(variant: str):
    cfg = tiny_preset(variant)
    return dataclasses.replace(
        cfg,
        sft=dataclasses.replace(cfg.sft, batch_size=1, per_device_batch_size=1, max_steps=3),
        grpo=dataclasses.replace(cfg.grpo, max_steps=1, num_generations=2, max_new_tokens=30),
        eval_max_new_tokens=30,
    )


def test_run_writes_stages_and_resumes(short_shards_dir, tmp_path):
    run = str(tmp_path / "run")
    metrics = run_pipeline(_config("grca_rpc"), short_shards_dir, run)
    assert set(METRIC_KEYS) <= set(metrics) and metrics["n"] == 1
    for name in ("config.json", "sft/checkpoint-3/model.safetensors", "grpo_grca_rpc/checkpoint-1/model.safetensors",
                 "grpo_grca_rpc/history.json", "compute.json", "eval/predictions.jsonl", "eval/metrics.json",
                 "curves.png"):
        assert pio.exists(pio.join(run, name)), name
    final = pio.join(run, "grpo_grca_rpc", "checkpoint-1", "model.safetensors")
    stamp = os.path.getmtime(final)
    assert run_pipeline(_config("grca_rpc"), short_shards_dir, run) == metrics  # finished stages are skipped
    assert os.path.getmtime(final) == stamp
    with pytest.raises(ValueError, match="another config"):
        run_pipeline(_config("broadcast"), short_shards_dir, run)


def test_budget_matched_sft_trains_on_as_many_samples_as_grpo(short_shards_dir, tmp_path):
    """GRPO trains on G completions per prompt (2 x 1 here): the baseline continues SFT for 2 samples, at
    the constant rate where SFT's schedule ended, and both stages' compute is logged."""
    run = str(tmp_path / "run")
    cfg = _config("sft_budget_matched")
    run_pipeline(cfg, short_shards_dir, run)
    history = pio.read_json(pio.join(run, "sft_budget_matched", "history.json"))
    assert history[-1]["samples"] == cfg.grpo.num_generations * cfg.grpo.max_steps == 2
    assert {r["learning_rate"] for r in history} == {cfg.sft.learning_rate * cfg.sft.min_lr_ratio}
    compute = {r["stage"]: r for r in pio.read_json(pio.join(run, "compute.json"))}
    assert compute["sft"]["optimizer_steps"] == 3 and compute["sft_budget_matched"]["samples"] == 2
    assert compute["sft"]["tokens"] > 0
    table = format_compute(list(compute.values())).splitlines()
    assert len(table) == 4 and table[3].startswith("| sft_budget_matched | 2 | 2 |")


def test_curves_show_grpo_diagnostics(tmp_path):
    from PIL import Image

    from pointvl.train.grpo import DIAGNOSED_FIELDS
    from pointvl.train.pipeline import plot_curves

    run = str(tmp_path / "run")
    pio.write_json(pio.join(run, "sft", "history.json"), [{"step": s, "loss": 1 / s} for s in (1, 2, 3)])
    grpo = [{"step": s, "loss": 0.1, "reward_format": 0.5, "reward_rpc": 0.2, "truncated": 0.3, "unparsable": 0.1,
             "clip_fraction": 0.0, **{f"zero_spread_{f}": 0.5 for f in DIAGNOSED_FIELDS}} for s in (1, 2)]
    pio.write_json(pio.join(run, "grpo_grca", "history.json"), grpo)
    one_row = Image.open(plot_curves(run, ["sft"])).size
    two_rows = Image.open(plot_curves(run, ["sft", "grpo_grca"])).size
    assert two_rows[1] == 2 * one_row[1] and two_rows[0] == 2 * one_row[0]
