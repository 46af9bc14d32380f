"""Bootstrap intervals and paired comparisons (pointvl.evaluation.stats) and their place in evaluate/report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pointvl.core import io as pio
from pointvl.core.errors import InputError
from pointvl.core.record import iter_records, target_text
from pointvl.evaluation.predict_reference import write_reference
from pointvl.evaluation.predictions import read_predictions
from pointvl.evaluation.report import report
from pointvl.evaluation.scoring import EvaluateConfig, aggregate, record_statistics, score_records
from pointvl.evaluation.stats import bootstrap_interval, mean, paired_comparison, resample_counts


def test_interval_coverage_on_synthetic_data_with_a_known_mean():
    """1,000 data sets of 200 Beta(2, 5) values (mean 2/7): the 95 % interval holds the mean 93-97 % of the time."""
    rng = np.random.default_rng(0)
    hits = 0
    for draw in range(1000):
        lo, hi = bootstrap_interval(mean(rng.beta(2, 5, size=200)), resamples=1000, seed=draw)
        hits += lo <= 2 / 7 <= hi
    assert 930 <= hits <= 970, hits


def test_resample_counts_are_resamples():
    counts = resample_counts(7, 50, seed=1)
    assert counts.shape == (50, 7) and (counts.sum(axis=1) == 7).all() and (counts >= 0).all()
    assert np.array_equal(counts, resample_counts(7, 50, seed=1))


def test_paired_comparison_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    base = rng.uniform(size=300)
    better = mean(np.clip(base + rng.normal(0.05, 0.05, size=300), 0, 1))
    same = paired_comparison(mean(base), mean(base))
    assert same["difference"] == 0 and same["p_value"] == 1.0 and same["interval"] == [0.0, 0.0]
    c = paired_comparison(better, mean(base))
    assert c["difference"] > 0 and c["interval"][0] > 0 and c["p_value"] < 0.001
    noise = paired_comparison(mean(base + rng.normal(0, 0.1, size=300)), mean(base))
    assert noise["interval"][0] < noise["difference"] < noise["interval"][1] and noise["p_value"] > 0.01
    with pytest.raises(ValueError, match="same records"):
        paired_comparison(mean(base), mean(base[:10]))


@pytest.fixture(scope="module")
def scored(eval_shards):
    """Ground truth with every second record's description and first answer changed (non-trivial BLEU, QA)."""
    preds = {}
    for k, r in enumerate(iter_records(eval_shards, "test")):
        o = json.loads(target_text(r, EvaluateConfig().quant))
        if k % 2:
            o["description"], o["answer"] = "a thing", "nothing"
        preds[r["instance_id"]] = json.dumps(o)
    return score_records(eval_shards, preds, EvaluateConfig())


@pytest.mark.parametrize("asked", [False, True])
def test_statistics_reproduce_every_metric(scored, asked):
    metrics, _ = aggregate(scored, asked)
    stats = record_statistics(scored, asked)
    for key, st in stats.items():
        assert float(st()) == pytest.approx(metrics[key], abs=1e-12), key
    assert {"bleu4", "qa_accuracy", "iou3d", "rougeL"} <= set(stats)


def test_evaluate_and_report_carry_intervals_comparisons_and_budgets(eval_shards, tmp_path):
    gt, mb = str(tmp_path / "gt.jsonl"), str(tmp_path / "mb.jsonl")
    write_reference("ground-truth", eval_shards, gt)
    write_reference("mean-box", eval_shards, mb)
    out = tmp_path / "report"
    text = report(eval_shards, str(out), {"mean box": mb, "truth": gt})
    saved = json.loads((out / "mean box.json").read_text())
    for key, (lo, hi) in saved["intervals"].items():
        assert lo <= saved[key] + 1e-12 and saved[key] <= hi + 1e-12, key
    assert set(saved["per_category"]["car"]["intervals"]) == set(saved["intervals"])
    lo, hi = saved["intervals"]["iou2d"]
    assert f"| mean box | {saved['iou2d']:.3f} [{lo:.3f}, {hi:.3f}] |" in text
    comparisons = json.loads((out / "comparisons.json").read_text())
    iou = comparisons["runs"]["truth"]["iou3d"]
    assert comparisons["reference"] == "mean box" and iou["difference"] > 0 and iou["interval"][0] > 0
    assert "**truth vs mean box**" in text and "| iou3d |" in text

    def with_budget(name: str, samples: int, source: str) -> str:  # a training run folder's layout
        run = tmp_path / name
        pio.write_bytes(str(run / "eval" / "predictions.jsonl"), pio.read_bytes(source))
        pio.write_json(str(run / "compute.json"), [{"stage": "sft", "samples": 100, "tokens": 1e4,
                                                   "generated_tokens": 0}, {"stage": "grpo", "samples": samples,
                                                                            "tokens": 2e4, "generated_tokens": 5e3}])
        return str(run / "eval" / "predictions.jsonl")

    a, b = with_budget("a", 400, gt), with_budget("b", 600, mb)
    with pytest.raises(InputError, match="differ by 40% in samples .*--allow-unmatched"):
        report(eval_shards, str(tmp_path / "r2"), {"a": a, "b": b})
    text = report(eval_shards, str(tmp_path / "r2"), {"a": a, "b": b}, allow_unmatched=True)
    assert "**Unmatched budgets** (--allow-unmatched)" in text and "| a | 500 |" in text
    c = with_budget("c", 410, mb)  # 510 vs 500 samples: within 5 %
    assert "Unmatched" not in report(eval_shards, str(tmp_path / "r3"), {"a": a, "c": c})
    assert read_predictions(c)  # the copied file is a predictions file
