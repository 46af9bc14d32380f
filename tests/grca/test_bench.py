"""benchmarks.bench_grca.run: the numbers it reports are consistent with each other (no timing thresholds)."""

from __future__ import annotations

import pytest

from benchmarks.bench_grca import run


def test_run_reports_consistent_numbers() -> None:
    r = run(group_size=4, repeats=2)
    assert set(r) == {"tokens_per_output", "score_ms_per_output", "score_ms_per_group", "forward_ms_per_group",
                      "tiny_model_params", "score_over_forward"}
    assert 150 < r["tokens_per_output"] < 600  # "~300 tokens" outputs with 16 keypoints per field
    assert r["score_ms_per_output"] * 4 == pytest.approx(r["score_ms_per_group"])
    assert r["score_over_forward"] == pytest.approx(r["score_ms_per_group"] / r["forward_ms_per_group"])
    assert r["tiny_model_params"] > 0
