"""Score one group of outputs: parse, reward, standardise, route (the GRCA entry point).

``score_group`` runs, for the G outputs of one prompt:

1-2. :func:`pointvl.grca.verify.verify` on each output, the verifier ``pointvl evaluate`` calls too: limits,
   ``parse_output`` (``parse.py``), field, RPC, format and answer rewards on de-quantized coordinates
   (``rewards.py``);
3. group standardisation and the background advantage for the chosen mode (``advantages.py``);
4. the straddle rule from token offsets to fields (``spans.py``) and routing of the advantages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pointvl.core.spatial import QuantConfig
from pointvl.grca.advantages import BACKGROUNDS, MODES, group_advantages, route, standardize
from pointvl.grca.parse import GEOMETRIC_FIELDS, ParsedField
from pointvl.grca.rewards import check_camera, check_target
from pointvl.grca.spans import token_field_ids
from pointvl.grca.verify import verify

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GRCAConfig:
    """Scoring knobs of GRCA besides the mode and λ, which ``score_group`` takes directly.

    Attributes:
        eps: added to the group std in eq. 9 (default 1e-4, as TRL's GRPOTrainer).
        background: ``"field_mean"`` (default; the background advantage is the mean of the sample's
            field advantages, ``docs/design.md#background-advantage``, a reading of §3.3) or
            ``"format_answer"`` (the standardised ``(format + answer) / 2`` reward).
        num_keypoints: kpts2d/kpts3d must hold exactly this many keypoints (16, the paper's §4.1; a
            field with another count scores 0, so one keypoint at the box centre earns nothing); None
            accepts any K >= 1. Must equal the build's ``geometry.num_keypoints``.
        keypoint_spread: the optional keypoint-spread guard (0: off, the paper's reward; e.g. 0.5 asks
            the keypoints to spread at least half as much as points uniform in the box:
            :func:`pointvl.grca.rewards.output_rewards`).
        quant: the coordinate bins the outputs use (``docs/design.md#quantization``; default 1000 bins).
    """

    eps: float = 1e-4
    background: str = "field_mean"
    num_keypoints: int | None = 16
    keypoint_spread: float = 0.0
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"GRCAConfig.eps must be > 0 (default 1e-4), got {self.eps}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"GRCAConfig.background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.num_keypoints is not None and self.num_keypoints < 1:
            raise ValueError(
                f"GRCAConfig.num_keypoints must be None or >= 1 (paper: 16), got {self.num_keypoints}"
            )
        if not 0 <= self.keypoint_spread <= 1:
            raise ValueError(f"GRCAConfig.keypoint_spread must lie in [0, 1] (0: off), got {self.keypoint_spread}")


@dataclass(frozen=True)
class GroupScore:
    """The result of :func:`score_group`, one entry per output in each list.

    Attributes:
        rewards: ``{bbox2d, bbox3d, kpts2d, kpts3d, rpc, background}``; ``background`` is the mean of the
            four field rewards (the broadcast sequence reward), or ``(format + answer) / 2`` when the
            config's background is ``"format_answer"`` and the mode is not broadcast.
        advantages: the same keys: standardised field and RPC advantages, and the final background
            advantage A~[i, bg] (in broadcast mode every key but rpc holds the sequence advantage).
        token_advantages: 1-D float64 arrays, one value per token offset.
        field_ids: 1-D int64 arrays, the field id per token (-1 background).
        parsed: the parsed outputs.
    """

    rewards: list[dict[str, float]]
    advantages: list[dict[str, float]]
    token_advantages: list[NDArray[np.float64]]
    field_ids: list[NDArray[np.int64]]
    parsed: list[dict[str, ParsedField]]


def score_group(
    outputs: Sequence[str],
    target: Mapping[str, Any],
    camera: Mapping[str, Any],
    token_offsets: Sequence[Sequence[tuple[int, int]]],
    mode: str = "grca_rpc",
    lam: float = 0.15,
    config: GRCAConfig | None = None,
) -> GroupScore:
    """Rewards and routed token advantages of the G outputs sampled for one prompt.

    Args:
        outputs: the G generated strings (coordinates as bins of ``config.quant``).
        target: ``bbox2d`` (pixels), ``bbox3d`` (world units), ``answer``.
        camera: ``K``, ``R``, ``t``, ``width``, ``height`` (OpenCV, ``x ~ K (R X + t)``).
        token_offsets: per output, the ``(start, end)`` characters of each of its tokens in ``outputs[i]``.
        mode: ``"broadcast"`` (vanilla GRPO), ``"grca"`` (routing) or ``"grca_rpc"`` (routing + RPC).
        lam: weight λ of the standardised RPC advantage added to the background (paper: 0.15).
        config: the other knobs (:class:`GRCAConfig`).
    """
    cfg = config if config is not None else GRCAConfig()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0 (paper: 0.15), got {lam}")
    if len(outputs) != len(token_offsets):
        raise ValueError(
            f"need one token_offsets entry per output, got {len(token_offsets)} for {len(outputs)} outputs"
        )
    check_target(target)
    check_camera(camera)

    verdicts = [verify(o, target, camera, cfg.quant, cfg.num_keypoints, cfg.keypoint_spread) for o in outputs]
    parsed, raw = [v.parsed for v in verdicts], [v.rewards for v in verdicts]
    fields = np.array([[r[f] for f in GEOMETRIC_FIELDS] for r in raw], dtype=np.float64)
    rpc = np.array([r["rpc"] for r in raw], dtype=np.float64)
    fmt_answer = np.array([(r["format"] + r["answer"]) / 2 for r in raw], dtype=np.float64)
    field_adv, bg_adv = group_advantages(fields, rpc, fmt_answer, mode, lam, cfg.eps, cfg.background)
    rpc_adv = standardize(rpc, cfg.eps)
    use_fmt = cfg.background == "format_answer" and mode != "broadcast"
    bg_reward = fmt_answer if use_fmt else fields.mean(axis=1)

    rewards, advantages, token_adv, ids = [], [], [], []
    for i, p in enumerate(parsed):
        rewards.append({**dict(zip(GEOMETRIC_FIELDS, fields[i].tolist(), strict=True)),
                        "rpc": float(rpc[i]), "background": float(bg_reward[i])})
        advantages.append({**dict(zip(GEOMETRIC_FIELDS, field_adv[i].tolist(), strict=True)),
                           "rpc": float(rpc_adv[i]), "background": float(bg_adv[i])})
        fid = token_field_ids(token_offsets[i], p)
        ids.append(fid)
        token_adv.append(route(fid, field_adv[i], bg_adv[i]))
    return GroupScore(rewards, advantages, token_adv, ids, parsed)
