"""routed_grpo_loss: vanilla GRPO as a special case, independent gradients, locality of field credit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointvl.grca import group_advantages, pad_token_advantages, route, routed_grpo_loss


def _batch(seed: int = 0, b: int = 4, t: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = torch.tensor([t, t - 2, 3, 1][:b])
    mask = (torch.arange(t)[None] < lengths[:, None]).to(torch.float64)
    return logp, old, adv, mask


def _reference_grad(logp, old, adv, mask, eps, beta=0.0, ref=None) -> np.ndarray:
    """d loss / d logp written out token by token (no autograd)."""
    lp, od, a, m = (x.detach().numpy() for x in (logp, old, adv, mask))
    grad = np.zeros_like(lp)
    b = lp.shape[0]
    for i in range(b):
        n = max(m[i].sum(), 1.0)
        for t in range(lp.shape[1]):
            if not m[i, t]:
                continue
            rho = np.exp(lp[i, t] - od[i, t])
            clipped = min(max(rho, 1 - eps), 1 + eps)
            g = -rho * a[i, t] if rho * a[i, t] <= clipped * a[i, t] else 0.0  # clipped branch is constant
            if beta:
                g += beta * (1 - np.exp(ref[i, t] - lp[i, t]))
            grad[i, t] = g / n / b
    return grad


def test_ratio_one_constant_advantages_is_vanilla_grpo() -> None:
    logp, _, _, mask = _batch()
    seq_adv = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    tok_adv = seq_adv[:, None].expand_as(logp)
    loss = routed_grpo_loss(logp, logp.detach(), tok_adv, mask)
    assert loss.item() == pytest.approx(-seq_adv.mean().item())
    (grad,) = torch.autograd.grad(loss, logp)
    expected = -seq_adv[:, None] * mask / mask.sum(1, keepdim=True) / len(seq_adv)
    assert torch.allclose(grad, expected)
    loss_b = routed_grpo_loss(logp, logp.detach(), seq_adv[:, None], mask)  # (B, 1) broadcasts
    assert loss_b.item() == pytest.approx(loss.item())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_matches_token_by_token_computation(seed: int) -> None:
    logp, old, adv, mask = _batch(seed)
    loss = routed_grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, logp)
    assert np.allclose(grad.numpy(), _reference_grad(logp, old, adv, mask, 0.2))
    ratio = torch.exp(logp - old)
    assert ((ratio - 1).abs() > 0.2).any(), "the batch must exercise the clipped branch"


def test_kl_term_value_and_gradient() -> None:
    logp, old, adv, mask = _batch(5)
    ref = logp.detach() + 0.2
    base = routed_grpo_loss(logp, old, adv, mask)
    loss = routed_grpo_loss(logp, old, adv, mask, beta=0.1, ref_logp=ref)
    diff = ref - logp.detach()
    kl = ((torch.exp(diff) - diff - 1) * mask).sum(1) / mask.sum(1)
    assert (loss - base).item() == pytest.approx(0.1 * kl.mean().item())
    (grad,) = torch.autograd.grad(loss, logp)
    assert np.allclose(grad.numpy(), _reference_grad(logp, old, adv, mask, 0.2, 0.1, ref.numpy()))


def test_gradcheck_away_from_kinks() -> None:
    logp, old, adv, mask = _batch(3)
    old = logp.detach() + 0.01  # ratios near 1: no clipping kink within the finite differences
    assert torch.autograd.gradcheck(lambda lp: routed_grpo_loss(lp, old, adv, mask), (logp,))


def test_padding_and_empty_sequences() -> None:
    logp, old, adv, mask = _batch()
    mask[3] = 0
    loss = routed_grpo_loss(logp, old, adv, mask)
    padded = logp.detach().clone()
    padded[mask == 0] = 123.0  # garbage under the mask changes nothing
    assert routed_grpo_loss(padded, old, adv, mask).item() == pytest.approx(loss.item())
    three = routed_grpo_loss(logp[:3], old[:3], adv[:3], mask[:3])
    assert loss.item() == pytest.approx(three.item() * 3 / 4)  # an empty sequence counts as 0 in the mean


def test_changing_one_field_reward_moves_only_its_tokens_and_background() -> None:
    rng = np.random.default_rng(0)
    g, fields = 8, rng.uniform(size=(8, 4))
    rpc = rng.uniform(size=g)
    ids = [np.array([-1, 0, 0, 0, -1, 1, 1, -1, 2, 2, 2, 2, -1, 3, 3, 3, -1])] * g
    changed = fields.copy()
    changed[2, 2] = 1.0 - changed[2, 2]  # kpts2d reward of output 2 only
    logp = (-torch.rand(g, 17, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(g, 17, dtype=torch.float64)
    mask = torch.ones(g, 17, dtype=torch.float64)

    def grad_for(r: np.ndarray, mode: str) -> torch.Tensor:
        a, bg = group_advantages(r, rpc, rpc, mode, 0.15, 1e-4, "field_mean")
        adv = pad_token_advantages([route(ids[i], a[i], bg[i]) for i in range(g)], 17).double()
        return torch.autograd.grad(routed_grpo_loss(logp, old, adv, mask), logp)[0]

    touched = torch.from_numpy(np.isin(ids[0], [2, -1]))
    for mode in ("grca", "grca_rpc"):
        moved = (grad_for(changed, mode) - grad_for(fields, mode)).abs() > 1e-12
        assert not moved[:, ~touched].any() and moved[:, touched].any()
    moved = (grad_for(changed, "broadcast") - grad_for(fields, "broadcast")).abs() > 1e-12
    assert moved[:, ~touched].any()  # the broadcast reward leaks into every field


def test_argument_validation() -> None:
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="clip_eps"):
        routed_grpo_loss(logp, old, adv, mask, clip_eps=0.0)
    with pytest.raises(ValueError, match="ref_logp"):
        routed_grpo_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="shape"):
        routed_grpo_loss(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="length"):
        pad_token_advantages([np.zeros(5)], 4)
