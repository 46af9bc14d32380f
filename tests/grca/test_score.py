"""Rewards, standardisation, background, RPC and routing of score_group, against hand computations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pointvl.core.spatial import QuantConfig, iou_2d, iou_3d, project_box3d
from pointvl.grca import (
    BACKGROUND,
    GEOMETRIC_FIELDS,
    GRCAConfig,
    format_output,
    group_advantages,
    parse_output,
    route,
    score_group,
)
from pointvl.grca.rewards import output_rewards

QC = QuantConfig()
EPS = 1e-4


def _std(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std(ddof=1) + EPS)


def _char_offsets(texts: list[str]) -> list[list[tuple[int, int]]]:
    return [[(i, i + 1) for i in range(len(t))] for t in texts]


def _output(target: dict, camera: dict, shift2d: float = 0.0, shift3d: float = 0.0, kpt_out: int = 0,
            answer: str = "chair", k: int = 16) -> str:
    """An output near the target: boxes shifted, ``kpt_out`` of ``k`` keypoints outside the target boxes."""
    b2 = np.asarray(target["bbox2d"]) + shift2d
    b3 = np.asarray(target["bbox3d"]) + shift3d
    c2 = (np.asarray(target["bbox2d"][:2]) + target["bbox2d"][2:]) / 2
    k2 = np.repeat(c2[None], k, 0)
    k3 = np.zeros((k, 3))
    k2[:kpt_out] = [1.0, 1.0]
    k3[:kpt_out] = [0.9, 0.9, 0.9]
    return format_output(answer, "d", b2, b3, k2, k3, camera["width"], camera["height"], QC)


def test_rewards_of_a_perfect_output(target: dict, camera: dict) -> None:
    r = output_rewards(parse_output(_output(target, camera)), target, camera, QC)
    assert r["bbox2d"] > 0.98 and r["bbox3d"] > 0.98 and r["rpc"] > 0.98
    assert r["kpts2d"] == 1.0 and r["kpts3d"] == 1.0 and r["format"] == 1.0 and r["answer"] == 1.0


def test_rewards_equal_geometry_on_dequantized_values(target: dict, camera: dict) -> None:
    text = _output(target, camera, shift2d=15.0, shift3d=0.1, kpt_out=1)
    p = parse_output(text)
    w, h = camera["width"], camera["height"]
    b2 = QC.dequantize_2d(p["bbox2d"].value, w, h)
    b3 = QC.dequantize_3d(p["bbox3d"].value)
    r = output_rewards(p, target, camera, QC)
    assert r["bbox2d"] == iou_2d(b2, target["bbox2d"])
    assert r["bbox3d"] == iou_3d(b3, target["bbox3d"])
    assert r["rpc"] == iou_2d(project_box3d(b3, camera["K"], camera["R"], camera["t"]), b2)
    assert r["kpts2d"] == 15 / 16 and r["kpts3d"] == 15 / 16
    assert 0 < r["bbox2d"] < 1 and 0 < r["bbox3d"] < 1


def test_invalid_fields_score_zero_and_break_rpc(target: dict, camera: dict) -> None:
    text = _output(target, camera).replace('"bbox3d": [', '"bbox3d": [1, ')
    r = output_rewards(parse_output(text), target, camera, QC)
    assert r["bbox3d"] == 0.0 and r["rpc"] == 0.0 and r["format"] == 0.0
    assert r["bbox2d"] > 0.98 and r["kpts3d"] == 1.0


def test_rpc_is_zero_behind_the_camera(target: dict, camera: dict) -> None:
    behind = {**camera, "t": np.array([0.0, 0.0, -3.0])}
    r = output_rewards(parse_output(_output(target, camera)), target, behind, QC)
    assert r["rpc"] == 0.0 and r["bbox2d"] > 0.98


def _group(target: dict, camera: dict) -> list[str]:
    return [
        _output(target, camera),
        _output(target, camera, shift2d=20.0, kpt_out=1),
        _output(target, camera, shift3d=0.15, kpt_out=2, answer="table"),
        _output(target, camera, shift2d=-10.0, shift3d=-0.05, kpt_out=3),
        "no json at all",
    ]


@pytest.mark.parametrize("mode", ["broadcast", "grca", "grca_rpc"])
@pytest.mark.parametrize("background", ["field_mean", "format_answer"])
def test_score_group_matches_hand_computation(target: dict, camera: dict, mode: str, background: str) -> None:
    outputs = _group(target, camera)
    offsets = _char_offsets(outputs)
    lam = 0.3
    res = score_group(outputs, target, camera, offsets, mode=mode, lam=lam, config=GRCAConfig(background=background))
    raw = [output_rewards(parse_output(o), target, camera, QC) for o in outputs]
    fields = np.array([[r[f] for f in GEOMETRIC_FIELDS] for r in raw])
    rpc = np.array([r["rpc"] for r in raw])
    fa = np.array([(r["format"] + r["answer"]) / 2 for r in raw])
    adv = np.stack([_std(fields[:, k]) for k in range(4)], axis=1)
    if mode == "broadcast":
        seq = _std(fields.mean(1))
        adv, bg = np.repeat(seq[:, None], 4, 1), seq
    else:
        bg = adv.mean(1) if background == "field_mean" else _std(fa)
        if mode == "grca_rpc":
            bg = bg + lam * _std(rpc)
    for i, text in enumerate(outputs):
        assert res.rewards[i]["rpc"] == rpc[i]
        assert set(res.rewards[i]) == {"bbox2d", "bbox3d", "kpts2d", "kpts3d", "rpc", "background"}
        assert res.advantages[i]["background"] == pytest.approx(bg[i])
        assert res.advantages[i]["rpc"] == pytest.approx(_std(rpc)[i])
        tok = res.token_advantages[i]
        assert tok.shape == (len(text),)
        p = res.parsed[i]
        for k, name in enumerate(GEOMETRIC_FIELDS):
            assert res.rewards[i][name] == fields[i, k]
            if p[name].valid:
                assert tok[slice(*p[name].span)] == pytest.approx(np.full(np.subtract(*p[name].span[::-1]), adv[i, k]))
        background_tokens = res.field_ids[i] == BACKGROUND
        assert background_tokens.any()
        assert tok[background_tokens] == pytest.approx(np.full(background_tokens.sum(), bg[i]))
    assert res.rewards[4]["background"] == 0.0 and not any(f.valid for f in res.parsed[4].values())


def test_group_advantages_mean_zero_and_constant_field(target: dict, camera: dict) -> None:
    rng = np.random.default_rng(0)
    fields = rng.uniform(size=(8, 4))
    fields[:, 2] = 0.5  # every output equally good on this field: no signal
    adv, bg = group_advantages(fields, rng.uniform(size=8), rng.uniform(size=8), "grca", 0.15, EPS, "field_mean")
    assert np.allclose(adv.mean(0), 0) and np.all(adv[:, 2] == 0)
    assert np.allclose(adv[:, [0, 1, 3]].std(0, ddof=1), 1, atol=1e-3)
    assert np.allclose(bg, adv.mean(1))


def test_changing_one_field_reward_changes_only_that_field_and_background() -> None:
    rng = np.random.default_rng(1)
    fields, rpc = rng.uniform(size=(8, 4)), rng.uniform(size=8)
    field_ids = np.array([-1, 0, 0, -1, 1, 1, -1, 2, 2, 2, -1, 3, 3, -1])
    changed = fields.copy()
    changed[3, 1] += 0.4  # bbox3d reward of output 3 only
    for mode in ("grca", "grca_rpc"):
        a0, b0 = group_advantages(fields, rpc, rpc, mode, 0.15, EPS, "field_mean")
        a1, b1 = group_advantages(changed, rpc, rpc, mode, 0.15, EPS, "field_mean")
        for i in range(8):
            diff = route(field_ids, a1[i], b1[i]) != route(field_ids, a0[i], b0[i])
            assert np.array_equal(diff, np.isin(field_ids, [1, -1]))
    a0, b0 = group_advantages(fields, rpc, rpc, "broadcast", 0.15, EPS, "field_mean")
    a1, b1 = group_advantages(changed, rpc, rpc, "broadcast", 0.15, EPS, "field_mean")
    assert np.all(route(field_ids, a1[0], b1[0]) != route(field_ids, a0[0], b0[0]))  # broadcast: every token


def test_rpc_reaches_only_the_background(target: dict, camera: dict) -> None:
    outputs = _group(target, camera)[:4]
    offsets = _char_offsets(outputs)
    with_rpc = score_group(outputs, target, camera, offsets, mode="grca_rpc")
    without = score_group(outputs, target, camera, offsets, mode="grca")
    for i in range(4):
        fields = with_rpc.field_ids[i] != BACKGROUND
        assert np.array_equal(with_rpc.token_advantages[i][fields], without.token_advantages[i][fields])
        delta = with_rpc.token_advantages[i][~fields] - without.token_advantages[i][~fields]
        assert delta == pytest.approx(np.full(delta.shape, 0.15 * with_rpc.advantages[i]["rpc"]))


def test_identical_outputs_get_zero_advantage(target: dict, camera: dict) -> None:
    outputs = [_output(target, camera, shift2d=5.0)] * 8
    res = score_group(outputs, target, camera, _char_offsets(outputs))
    assert all(np.all(np.abs(a) < 1e-9) for a in res.token_advantages)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mode": "ppo"}, "mode"), ({"lam": -1.0}, "lam"), ({"lam": float("nan")}, "lam")],
)
def test_score_group_rejects_bad_arguments(target: dict, camera: dict, kwargs: dict[str, Any], match: str) -> None:
    outputs = _group(target, camera)[:2]
    with pytest.raises(ValueError, match=match):
        score_group(outputs, target, camera, _char_offsets(outputs), **kwargs)


def test_score_group_rejects_bad_inputs(target: dict, camera: dict) -> None:
    outputs = _group(target, camera)[:2]
    offsets = _char_offsets(outputs)
    with pytest.raises(ValueError, match="token_offsets"):
        score_group(outputs, target, camera, offsets[:1])
    with pytest.raises(ValueError, match="answer"):
        score_group(outputs, {"bbox2d": target["bbox2d"], "bbox3d": target["bbox3d"]}, camera, offsets)
    with pytest.raises(ValueError, match="K, R, t"):
        score_group(outputs, target, {"K": camera["K"]}, offsets)
    with pytest.raises(ValueError, match="at least 2"):
        score_group(outputs[:1], target, camera, offsets[:1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"eps": 0.0}, "eps"), ({"background": "answer"}, "background"), ({"num_keypoints": 0}, "num_keypoints")],
)
def test_grca_config_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GRCAConfig(**kwargs)
