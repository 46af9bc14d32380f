"""The routed GRPO objective (paper §3.5, eq. 15-16), in torch.

For sample i and completion token t with routed advantage ``A[i, t]``::

    rho[i, t]  = exp(logp[i, t] - old_logp[i, t])                                  (eq. 15)
    l[i, t]    = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * KL[i, t]
    loss       = mean_i ( sum_t mask[i, t] l[i, t] / |o_i| ),  |o_i| = sum_t mask[i, t]   (eq. 16)

i.e. a token mean within each sequence, then the mean over the B sequences of the batch (for one
group, B = G). ``KL`` is the k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` used by GRPO/TRL,
added only when ``beta > 0``. A sequence with no completion token (all-zero mask) contributes 0 but
still counts in the mean over B. Only the clipped surrogate is implemented (no dual-clip, no
sequence-length-free normalisation such as Dr. GRPO's).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)


def routed_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
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
    """
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
    per_seq = (per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
    return per_seq.mean()


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
