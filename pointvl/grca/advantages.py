"""Group-standardised advantages and their routing onto tokens (paper §3.3 eq. 9-10, §3.4 eq. 14).

For a group of G outputs with field rewards ``r[i, f]`` (f in bbox2d, bbox3d, kpts2d, kpts3d):

- **Standardisation** (eq. 9): ``A[i, f] = (r[i, f] - mean_j r[j, f]) / (std_j r[j, f] + eps)``, with the
  unbiased std (ddof = 1, as TRL's GRPOTrainer) and ``eps = 1e-4`` by default; a field on which all G
  outputs score the same gets advantage 0.
- **Background** (``docs/design.md#background-advantage``, a reading of the paper): by default
  ``A[i, bg] = mean_f A[i, f]``, the mean of the sample's four standardised field advantages (not the
  standardised mean reward); the option ``"format_answer"`` standardises ``(format + answer) / 2``
  instead (see ``rewards.py``).
- **RPC** (eq. 14, mode ``grca_rpc``): ``A~[i, bg] = A[i, bg] + lam * std(r_rpc)[i]``, ``lam = 0.15``;
  RPC never reaches a field's tokens.
- **Routing** (eq. 10): token t of sample i gets ``A[i, f]`` when it belongs to field f, else ``A~[i, bg]``.
- **Broadcast** baseline (vanilla GRPO, Table 3): one sequence reward, the mean of the four field
  rewards, standardised in the group and given to every token; the background option is ignored.
- **GRCA without RPC** (mode ``grca``): routing with ``A~[i, bg] = A[i, bg]``.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import ArrayLike, NDArray

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("broadcast", "grca", "grca_rpc")
BACKGROUNDS: tuple[str, ...] = ("field_mean", "format_answer")


def standardize(rewards: ArrayLike, eps: float) -> NDArray[np.float64]:
    """``(r - mean) / (std + eps)`` over the group axis 0 (std with ddof = 1); needs G >= 2."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape[0] < 2:
        raise ValueError(f"group standardisation needs at least 2 outputs per prompt, got {r.shape[0]}")
    return (r - r.mean(axis=0)) / (r.std(axis=0, ddof=1) + eps)


def group_advantages(
    field_rewards: ArrayLike,
    rpc_rewards: ArrayLike,
    background_rewards: ArrayLike,
    mode: str,
    lam: float,
    eps: float,
    background: str,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Field advantages ``(G, 4)`` and background advantages ``(G,)`` of one group.

    Args:
        field_rewards: ``(G, 4)`` rewards in :data:`~pointvl.grca.parse.GEOMETRIC_FIELDS` order.
        rpc_rewards: ``(G,)`` reprojection-consistency rewards (used by ``grca_rpc`` only).
        background_rewards: ``(G,)`` format/answer rewards (used by ``background="format_answer"`` only).
        mode: one of :data:`MODES`; lam: RPC weight; eps: standardisation epsilon;
        background: one of :data:`BACKGROUNDS`.

    In ``broadcast`` mode every column of the field advantages equals the background advantage, so
    routing gives every token the same value.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    r = np.asarray(field_rewards, dtype=np.float64)
    if mode == "broadcast":
        seq = standardize(r.mean(axis=1), eps)
        return np.repeat(seq[:, None], r.shape[1], axis=1), seq
    adv = standardize(r, eps)
    bg = adv.mean(axis=1) if background == "field_mean" else standardize(background_rewards, eps)
    if mode == "grca_rpc":
        bg = bg + lam * standardize(rpc_rewards, eps)
    return adv, bg


def route(field_ids: ArrayLike, field_adv: ArrayLike, background_adv: float) -> NDArray[np.float64]:
    """Token-wise advantages of one sample (eq. 10): ``field_adv[id]`` for field tokens, else background.

    ``field_ids`` holds one id per token (``-1`` = background, see ``spans.token_field_ids``).
    """
    table = np.append(np.asarray(field_adv, dtype=np.float64), float(background_adv))
    return table[np.asarray(field_ids, dtype=np.int64)]
