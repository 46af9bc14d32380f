"""A toy demonstration: a tabular policy that writes the four fields learns faster with routed advantages.

The policy picks each coordinate of bbox2d (4), bbox3d (6), kpts2d (4 x 2) and kpts3d (4 x 3) from 11
candidate bins with its own softmax (a table of logits, no context). Each sampled choice is one token
of a real output string, so the whole pipeline runs: ``score_group`` parses the string, computes the
IoU / containment rewards against the target and routes the advantages onto the coordinate tokens,
and ``routed_grpo_loss`` (on-policy, ratio 1) gives the gradient. The punctuation and key tokens are
fixed by the template and carry no log-probability, so only coordinate tokens learn.

Field accuracy = the mean over the four fields of the greedy output's field reward (IoU2D, IoU3D,
KPA-2D, KPA-3D), after a fixed number of steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pointvl.core.spatial import QuantConfig
from pointvl.grca import GEOMETRIC_FIELDS, GRCAConfig, routed_grpo_loss, score_group

QC = QuantConfig()
N_CAND, K_PTS, G = 11, 4, 8
CFG = GRCAConfig(num_keypoints=K_PTS)  # the toy policy writes K_PTS keypoints per field
OFFSETS = np.arange(N_CAND) - N_CAND // 2


def _candidates(target: dict[str, Any], camera: dict[str, Any]) -> dict[str, np.ndarray]:
    """Candidate bins per slot: boxes around the truth, keypoints across and beyond the target box."""
    w, h = camera["width"], camera["height"]
    b2, b3 = np.asarray(target["bbox2d"]), np.asarray(target["bbox3d"])
    size2 = np.tile(b2[2:] - b2[:2], 2)
    size3 = np.tile(b3[3:] - b3[:3], 2)
    c2 = b2[:, None] + OFFSETS[None] * 0.08 * size2[:, None]
    c3 = b3[:, None] + OFFSETS[None] * 0.08 * size3[:, None]
    span2 = np.linspace(b2[:2] - 0.6 * size2[:2], b2[2:] + 0.6 * size2[:2], N_CAND).T  # (2, N)
    span3 = np.linspace(b3[:3] - 0.6 * size3[:3], b3[3:] + 0.6 * size3[:3], N_CAND).T  # (3, N)
    k2 = np.tile(span2, (K_PTS, 1))
    k3 = np.tile(span3, (K_PTS, 1))
    return {
        "bbox2d": QC.quantize_2d(c2.T, w, h).T, "bbox3d": QC.quantize_3d(c3),
        "kpts2d": QC.quantize_2d(k2.T, w, h).T, "kpts3d": QC.quantize_3d(np.clip(k3, -1, 1)),
    }


def _write(choice: dict[str, np.ndarray]) -> tuple[str, list[tuple[int, int]], list[int]]:
    """Output string, token offsets (one token per number, one per run of template text) and the
    indices of the coordinate tokens in slot order."""
    parts: list[tuple[str, bool]] = [('{"answer": "chair", "description": "a chair", ', False)]
    for f in GEOMETRIC_FIELDS:
        vals = choice[f].tolist()
        parts.append((f'"{f}": [', False))
        if f.startswith("kpts"):
            d = 2 if f == "kpts2d" else 3
            for k in range(0, len(vals), d):
                parts.append(("[" if k == 0 else ", [", False))
                for j in range(d):
                    parts.append((str(vals[k + j]), True))
                    parts.append((", " if j < d - 1 else "]", False))
        else:
            for j, v in enumerate(vals):
                parts.append((str(v), True))
                parts.append((", " if j < len(vals) - 1 else "", False))
        parts.append(("], " if f != "kpts3d" else "]}", False))
    text, offsets, coord = "", [], []
    for piece, is_coord in parts:
        if not piece:
            continue
        if is_coord:
            coord.append(len(offsets))
        offsets.append((len(text), len(text) + len(piece)))
        text += piece
    return text, offsets, coord


def _train(mode: str, target: dict, camera: dict, steps: int, seed: int) -> float:
    cands = _candidates(target, camera)
    slots = [(f, j) for f in GEOMETRIC_FIELDS for j in range(len(cands[f]))]
    logits = torch.zeros(len(slots), N_CAND, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    gen = torch.Generator().manual_seed(seed)

    def render(idx: torch.Tensor) -> tuple[str, list[tuple[int, int]], list[int]]:
        choice: dict[str, list[int]] = {f: [] for f in GEOMETRIC_FIELDS}
        for s, (f, j) in enumerate(slots):
            choice[f].append(int(cands[f][j, idx[s]]))
        return _write({f: np.asarray(v) for f, v in choice.items()})

    for _ in range(steps):
        probs = torch.softmax(logits.detach(), dim=1)
        idx = torch.multinomial(probs, G, replacement=True, generator=gen).T  # (G, slots)
        texts, offsets, coords = zip(*(render(idx[i]) for i in range(G)), strict=True)
        res = score_group(list(texts), target, camera, list(offsets), mode=mode, config=CFG)
        adv = torch.tensor(np.stack([res.token_advantages[i][coords[i]] for i in range(G)]), dtype=torch.float32)
        logp = torch.log_softmax(logits, dim=1)[torch.arange(len(slots))[None], idx]  # (G, slots)
        loss = routed_grpo_loss(logp, logp.detach(), adv, torch.ones_like(logp))
        opt.zero_grad()
        loss.backward()
        opt.step()
    greedy = render(logits.detach().argmax(dim=1))
    res = score_group([greedy[0]] * 2, target, camera, [greedy[1]] * 2, mode=mode, config=CFG)
    return float(np.mean([res.rewards[0][f] for f in GEOMETRIC_FIELDS]))


def test_writer_makes_valid_outputs(target: dict, camera: dict) -> None:
    cands = _candidates(target, camera)
    text, offsets, coord = _write({f: c[:, N_CAND // 2] for f, c in cands.items()})
    res = score_group([text, text], target, camera, [offsets, offsets], config=CFG)
    assert all(p.valid for p in res.parsed[0].values())
    assert "".join(text[s:e] for s, e in offsets) == text
    assert len(coord) == 4 + 6 + 2 * K_PTS + 3 * K_PTS and (res.field_ids[0][coord] >= 0).all()
    assert res.rewards[0]["bbox2d"] > 0.95 and res.rewards[0]["kpts3d"] == 1.0


def test_routed_advantages_learn_faster_than_broadcast(target: dict, camera: dict) -> None:
    steps, seeds = 40, (0, 1)
    acc = {m: np.mean([_train(m, target, camera, steps, s) for s in seeds]) for m in ("broadcast", "grca_rpc")}
    start = _train("broadcast", target, camera, 0, 0)
    assert acc["grca_rpc"] > acc["broadcast"] + 0.05, acc
    assert acc["broadcast"] > start, (start, acc)  # both learn; routing learns faster
