"""The training flow's stages on a run folder: checkpoints, metrics, curves, resume, config guard."""

import dataclasses
import os

import pytest

from pointvl import io as pio
from pointvl.evaluate import METRIC_KEYS
from pointvl.train.config import tiny_preset
from pointvl.train.pipeline import run_pipeline


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
    for name in ("config.json", "sft/model.pt", "grpo_grca_rpc/model.pt", "grpo_grca_rpc/history.json",
                 "eval/predictions.jsonl", "eval/metrics.json", "curves.png"):
        assert pio.exists(pio.join(run, name)), name
    stamp = os.path.getmtime(pio.join(run, "grpo_grca_rpc", "model.pt"))
    assert run_pipeline(_config("grca_rpc"), short_shards_dir, run) == metrics  # finished stages are skipped
    assert os.path.getmtime(pio.join(run, "grpo_grca_rpc", "model.pt")) == stamp
    with pytest.raises(ValueError, match="another config"):
        run_pipeline(_config("broadcast"), short_shards_dir, run)


def test_budget_matched_sft_runs_as_many_steps_as_grpo(short_shards_dir, tmp_path):
    run = str(tmp_path / "run")
    run_pipeline(_config("sft_budget_matched"), short_shards_dir, run)
    assert len(pio.read_json(pio.join(run, "sft_budget_matched", "history.json"))) == 1
