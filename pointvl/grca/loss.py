"""The routed GRPO objective (paper §3.5, eq. 15-16), in torch, with TRL 1.16's three normalisations.

For sample i and completion token t with routed advantage ``A[i, t]``::

    rho[i, t]  = exp(logp[i, t] - old_logp[i, t])                                  (eq. 15)
    l[i, t]    = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * KL[i, t]

and the loss sums ``mask * l`` with one of TRL ``GRPOTrainer``'s normalisations (``loss_type``, the names
and formulas of ``trl==1.16.0`` ``GRPOTrainer._compute_loss``)::

    grpo     mean_i ( sum_t mask l / |o_i| ),  |o_i| = max(sum_t mask[i, t], 1)   (eq. 16: the paper's)
    dapo     sum_{i,t} mask l / num_items      (token mean; num_items = the batch's completion tokens)
    dr_grpo  sum_{i,t} mask l / (B * max_completion_length)   (Dr. GRPO: a constant denominator)

``grpo`` is the default (the paper's eq. 16). For ``dapo``, ``num_items`` defaults to the tokens of this
batch (``mask.sum()``); a training loop that splits one optimizer step's tokens over several backward
passes passes the step's count rescaled to one pass, as TRL does with ``num_items_in_batch``. ``KL`` is
the k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` used by GRPO/TRL, added only when ``beta > 0``.
A sequence with no completion token (all-zero mask) contributes 0 (in ``grpo`` it still counts in the
mean over B). Only the token-level clipped surrogate is implemented: no dual-clip, no ``epsilon_high``
different from ``epsilon`` (DAPO's clip-higher), no sequence-level importance sampling. Dr. GRPO's other
change, advantages without division by the group std (TRL's ``scale_rewards``), is not part of
``loss_type``, here as in TRL: the advantages are computed by :mod:`pointvl.grca.advantages`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)

LOSS_TYPES: tuple[str, ...] = ("grpo", "dapo", "dr_grpo")


def routed_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items: float | None = None,
) -> torch.Tensor:
    """The negated routed surrogate (a scalar to minimise); all tensors are ``(B, T)``.

    Args:
        logp: log-probabilities of the sampled tokens under the current policy (with grad).
        old_logp: the same under the rollout policy (no grad needed).
        advantages: routed token advantages (``GroupScore.token_advantages`` padded with
            :func:`pad_token_advantages`); a ``(B, 1)`` tensor broadcasts one advantage per sequence.
        mask: 1 for completion tokens, 0 for padding (bool or float).
        clip_eps: clipping threshold epsilon (paper/TRL: 0.2).
        beta: KL weight (``docs/design.md#objective``; default 0); needs ``ref_logp`` when > 0.
        ref_logp: log-probabilities under the reference policy.
        loss_type: the normalisation, one of :data:`LOSS_TYPES` (module docstring; default ``"grpo"``).
        max_completion_length: the generation budget, the denominator of ``dr_grpo`` (required there).
        num_items: the token count ``dapo`` divides by (default: ``mask.sum()``, clamped to >= 1).
    """
    if num_items is not None and not num_items > 0:
        raise ValueError(f"num_items must be > 0 (the tokens dapo averages over), got {num_items}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (TRL 1.16's names), got {loss_type!r}")
    if loss_type == "dr_grpo" and not (max_completion_length and max_completion_length > 0):
        raise ValueError("loss_type='dr_grpo' divides by max_completion_length: pass the generation budget (> 0)")
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must lie in (0, 1) (GRPO uses 0.2), got {clip_eps}")
    if beta < 0 or (beta > 0 and ref_logp is None):
        raise ValueError(f"beta must be >= 0 and, when > 0, ref_logp must be given; got beta={beta}")
    if logp.shape != old_logp.shape or logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(f"logp, old_logp and mask must share one (B, T) shape, got "
                         f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(mask.shape)}")
    m = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    ratio = torch.exp(logp - old_logp.detach())
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    if beta > 0 and ref_logp is not None:  # both hold together after the check above
        diff = ref_logp.detach() - logp
        per_token = per_token + beta * (torch.exp(diff) - diff - 1)
    if loss_type == "grpo":
        return ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "dapo":
        total = m.sum().clamp(min=1) if num_items is None else num_items
        return (per_token * m).sum() / total
    return (per_token * m).sum() / (per_token.shape[0] * max_completion_length)


def clip_fraction(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2
) -> float:
    """Share of completion tokens whose ratio is clipped on the side that removes their gradient (TRL's
    ``clip_ratio/region_mean``): ``rho < 1 - eps`` with ``A < 0``, or ``rho > 1 + eps`` with ``A > 0``."""
    ratio = torch.exp(logp.detach() - old_logp.detach())
    adv = advantages.to(ratio.dtype)
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    m = mask.to(ratio.dtype)
    return float((clipped.to(ratio.dtype) * m).sum() / m.sum().clamp(min=1))


def pad_token_advantages(token_advantages: Sequence[ArrayLike], length: int) -> torch.Tensor:
    """Stack per-sample token advantages into a ``(B, length)`` float32 tensor, zero-padded on the right.

    Raises ValueError if a sample has more than ``length`` tokens.
    """
    rows = [np.asarray(a, dtype=np.float32).reshape(-1) for a in token_advantages]
    if any(len(r) > length for r in rows):
        raise ValueError(f"a sample has {max(len(r) for r in rows)} tokens, more than length={length}")
    out = torch.zeros(len(rows), length, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.from_numpy(r)
    return out
