"""Tests of the hierarchical prior and the HGAD losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from hgad.errors import ConfigError
from hgad.losses import (
    LossConfig,
    hgad_loss,
    intra_log_mixture,
    loss_entropy,
    loss_g,
    loss_gaussian,
    loss_intra,
    loss_mi,
    loss_z,
    sq_distances,
)
from hgad.prior import HierarchicalPrior, init_main_centres
from worked_example import D_INTRA, D_MAIN, DELTA, LABELS, LOGDET, MU, PI, W, Z

LN2PI = math.log(2 * math.pi)


def _tensors():
    return (
        torch.tensor(Z),
        torch.tensor(LOGDET),
        torch.tensor(LABELS),
        torch.tensor(MU),
        torch.log(torch.tensor(PI)),
    )


def _centres() -> tuple[torch.Tensor, torch.Tensor]:
    mu = torch.tensor(MU)
    centres = torch.stack([mu, mu + torch.tensor(DELTA)[:, 0]], dim=1)  # (Y, K, D)
    return centres, torch.log(torch.tensor(W))


def _hand_g() -> float:
    return (
        sum(
            (-math.log(PI[0] * math.exp(-d[0] / 2) + PI[1] * math.exp(-d[1] / 2)) - ld) / 2
            for d, ld in zip(D_MAIN, LOGDET)
        )
        / 3
    )


def _hand_mi(labels: list[int]) -> float:
    total = 0.0
    for d, y in zip(D_MAIN, labels):
        joint = [PI[0] * math.exp(-d[0] / 2), PI[1] * math.exp(-d[1] / 2)]
        post = [j / sum(joint) for j in joint]
        target = [0.98 * (k == y) + 0.01 for k in range(2)]
        total += sum(t * (math.log(p) - math.log(q)) for t, p, q in zip(target, post, PI))
    return total / 3


def _hand_e() -> float:
    total = 0.0
    for d in D_MAIN:
        e = [math.exp(-d[0] / 2), math.exp(-d[1] / 2)]
        p = [v / sum(e) for v in e]
        total += -sum(v * math.log(v) for v in p)
    return total / 3


def _hand_log_mix() -> list[float]:
    return [
        math.log(W[y][0] * math.exp(-d[0] / 2) + W[y][1] * math.exp(-d[1] / 2))
        for d, y in zip(D_INTRA, LABELS)
    ]


def _hand_in() -> float:
    return sum((-m - ld) / 2 for m, ld in zip(_hand_log_mix(), LOGDET)) / 3


def _hand_z() -> float:
    total = 0.0
    for m, ld in zip(_hand_log_mix(), LOGDET):
        logp = (-2 * 0.5 * LN2PI + m + ld) / 2
        total += math.log(1 + math.exp(-logp))
    return total / 3


def _hand_prior() -> HierarchicalPrior:
    prior = HierarchicalPrior(2, 2, 2, seed=0)
    with torch.no_grad():
        prior.mu.copy_(torch.tensor(MU))
        prior.phi.copy_(torch.log(torch.tensor(PI)) + 0.7)  # softmax is shift invariant
        prior.delta.copy_(torch.tensor(DELTA))
        prior.psi.copy_(torch.log(torch.tensor(W)) - 0.3)
    return prior


# ---- prior ------------------------------------------------------------------------------------------


def test_init_main_centres_by_hand() -> None:
    s = 5 / math.sqrt(4)  # floor(2*7/3) = 4
    expected = torch.tensor(
        [
            [s, 0, 0, s, 0, 0, 0],
            [0, s, 0, 0, s, 0, 0],
            [0, 0, s, 0, 0, s, 0],
        ]
    )
    assert torch.equal(init_main_centres(3, 7), expected)


def test_init_main_centres_pairs_five_apart() -> None:
    mu = init_main_centres(15, 200)
    dist = torch.cdist(mu.double(), mu.double())
    off = dist[~torch.eye(15, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, 5.0), rtol=0, atol=1e-5)
    # fewer dims than classes: documented random fallback, deterministic, roughly 5 apart
    small = init_main_centres(15, 10)
    assert small.shape == (15, 10)
    assert torch.equal(small, init_main_centres(15, 10))
    mean_dist = torch.cdist(small, small)[~torch.eye(15, dtype=torch.bool)].mean().item()
    assert 3.5 < mean_dist < 6.5
    with pytest.raises(ConfigError):
        init_main_centres(0, 4)


def test_prior_shapes_and_init() -> None:
    prior = HierarchicalPrior(3, 4, 5, seed=1)
    assert prior.mu.shape == (3, 4) and prior.phi.shape == (3,)
    assert prior.delta.shape == (3, 4, 4) and prior.psi.shape == (3, 5)
    assert torch.equal(prior.phi.detach(), torch.zeros(3)) and torch.equal(
        prior.psi.detach(), torch.zeros(3, 5)
    )
    expected_delta = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(prior.delta.detach(), expected_delta)
    torch.testing.assert_close(prior.log_pi(), torch.full((3,), -math.log(3)))
    torch.testing.assert_close(prior.log_w(), torch.full((3, 5), -math.log(5)))
    assert prior.main_parameters() == [prior.mu, prior.phi]
    assert prior.intra_parameters() == [prior.delta, prior.psi]
    with pytest.raises(ConfigError):
        HierarchicalPrior(3, 4, 0)


def test_intra_centres_stop_gradient() -> None:
    prior = HierarchicalPrior(3, 4, 3, seed=0)
    centres = prior.intra_centres()
    assert centres.shape == (3, 3, 4)
    assert torch.equal(centres[:, 0], prior.mu.detach())
    assert torch.equal(centres[:, 1:], prior.mu.detach()[:, None] + prior.delta.detach())
    (centres**2).sum().backward()
    assert prior.mu.grad is None
    assert prior.delta.grad is not None and prior.delta.grad.abs().sum() > 0


def test_single_intra_component() -> None:
    prior = HierarchicalPrior(3, 4, 1, seed=0)
    assert prior.delta.shape == (3, 0, 4)
    assert torch.equal(prior.intra_centres(), prior.mu.detach()[:, None])
    torch.testing.assert_close(prior.log_w(), torch.zeros(3, 1))
    z = torch.randn(6, 4)
    out = hgad_loss(z, torch.zeros(6), torch.tensor([0, 1, 2, 0, 1, 2]), prior, stage=2, cfg=LossConfig())
    assert torch.isfinite(out["total"])
    # K = 1: the intra mixture is the Gaussian around the (stopped) main centre
    d = ((z - prior.mu.detach()[[0, 1, 2, 0, 1, 2]]) ** 2).sum(1)
    torch.testing.assert_close(out["in"], (0.5 * d / 4).mean())


# ---- losses against hand values ---------------------------------------------------------------------


def test_sq_distances_hand_and_cdist() -> None:
    z, _, _, mu, _ = _tensors()
    torch.testing.assert_close(sq_distances(z, mu), torch.tensor(D_MAIN))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 16, generator=gen) * 3
    b = torch.randn(7, 16, generator=gen) * 3
    torch.testing.assert_close(sq_distances(a, b), torch.cdist(a.double(), b.double()).float() ** 2)
    assert sq_distances(a, a).min() >= 0
    assert sq_distances(a.bfloat16(), b).dtype == torch.float32


def test_loss_g_by_hand() -> None:
    z, logdet, _, mu, log_pi = _tensors()
    assert loss_g(z, logdet, mu, log_pi).item() == pytest.approx(_hand_g(), rel=1e-6)


def test_loss_mi_by_hand_and_sign() -> None:
    z, _, labels, mu, log_pi = _tensors()
    mi = loss_mi(z, labels, mu, log_pi)
    assert mi.item() == pytest.approx(_hand_mi(LABELS), rel=1e-6)
    swapped = loss_mi(z, 1 - labels, mu, log_pi)
    assert swapped.item() == pytest.approx(_hand_mi([1 - y for y in LABELS]), rel=1e-6)
    # vectors near their own class centre carry more information about their class
    assert mi.item() > swapped.item()
    on_centre = loss_mi(mu, torch.tensor([0, 1]), mu, log_pi)
    off_centre = loss_mi(mu, torch.tensor([1, 0]), mu, log_pi)
    assert on_centre.item() > 0 > off_centre.item()
    # no smoothing: sum reduces to log p(y_i|z_i) - log pi_{y_i}
    d = D_MAIN[0]
    joint = [PI[0] * math.exp(-d[0] / 2), PI[1] * math.exp(-d[1] / 2)]
    expected = math.log(joint[0] / sum(joint)) - math.log(PI[0])
    assert loss_mi(z[:1], labels[:1], mu, log_pi, smoothing=0.0).item() == pytest.approx(expected, rel=1e-6)


def test_loss_entropy_by_hand() -> None:
    z, _, _, mu, _ = _tensors()
    assert loss_entropy(z, mu).item() == pytest.approx(_hand_e(), rel=1e-6)


def test_intra_losses_by_hand() -> None:
    z, logdet, labels, _, _ = _tensors()
    centres, log_w = _centres()
    torch.testing.assert_close(intra_log_mixture(z, labels, centres, log_w), torch.tensor(_hand_log_mix()))
    assert loss_intra(z, logdet, labels, centres, log_w).item() == pytest.approx(_hand_in(), rel=1e-6)
    assert loss_z(z, logdet, labels, centres, log_w).item() == pytest.approx(_hand_z(), rel=1e-6)


def test_loss_gaussian_by_hand() -> None:
    z, logdet, _, _, _ = _tensors()
    sq = [1.25, 1.0, 1.0]
    expected = sum((LN2PI + 0.5 * q - ld) / 2 for q, ld in zip(sq, LOGDET)) / 3
    assert loss_gaussian(z, logdet).item() == pytest.approx(expected, rel=1e-6)
    out = hgad_loss(z, logdet, None, None, stage=1, cfg=LossConfig(prior="gaussian"))
    assert set(out) == {"g", "total"}
    assert out["total"].item() == pytest.approx(expected, rel=1e-6)


def test_intra_log_mixture_matches_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    n, y, k, dim = 40, 4, 5, 8
    z = torch.randn(n, dim, generator=gen) * 2
    labels = torch.randint(0, y, (n,), generator=gen)
    centres = torch.randn(y, k, dim, generator=gen) * 2
    log_w = torch.log_softmax(torch.randn(y, k, generator=gen), dim=1)
    expected = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        terms = [
            -0.5 * float(((z[i].double() - centres[labels[i], j].double()) ** 2).sum())
            + float(log_w[labels[i], j])
            for j in range(k)
        ]
        top = max(terms)
        expected[i] = top + math.log(sum(math.exp(t - top) for t in terms))
    torch.testing.assert_close(
        intra_log_mixture(z, labels, centres, log_w).double(), expected, rtol=1e-5, atol=1e-4
    )


# ---- the assembled objective ------------------------------------------------------------------------


def test_hgad_loss_totals_by_hand() -> None:
    z, logdet, labels, _, _ = _tensors()
    prior = _hand_prior()
    cfg = LossConfig(lambda1=2.0, lambda2=3.0)
    one = hgad_loss(z, logdet, labels, prior, stage=1, cfg=cfg)
    assert set(one) == {"g", "mi", "e", "total"}
    stage1 = 2.0 * _hand_g() - 3.0 * _hand_mi(LABELS) + _hand_e()
    assert one["total"].item() == pytest.approx(stage1, rel=1e-5)
    two = hgad_loss(z, logdet, labels, prior, stage=2, cfg=cfg)
    assert set(two) == {"g", "mi", "e", "in", "z", "total"}
    assert two["in"].item() == pytest.approx(_hand_in(), rel=1e-6)
    assert two["z"].item() == pytest.approx(_hand_z(), rel=1e-6)
    assert two["total"].item() == pytest.approx(stage1 + _hand_in() + _hand_z(), rel=1e-5)
    # bf16 input is computed in float32
    low = hgad_loss(z.bfloat16(), logdet.bfloat16(), labels, prior, stage=2, cfg=cfg)
    assert low["total"].dtype == torch.float32


def test_switches_drop_terms() -> None:
    z, logdet, labels, _, _ = _tensors()
    prior = _hand_prior()
    out = hgad_loss(
        z, logdet, labels, prior, stage=2, cfg=LossConfig(use_mi=False, use_entropy=False, use_intra=False)
    )
    assert set(out) == {"g", "total"}
    assert out["total"].item() == pytest.approx(_hand_g(), rel=1e-6)
    with pytest.raises(ConfigError):
        hgad_loss(z, logdet, labels, prior, stage=3, cfg=LossConfig())
    with pytest.raises(ConfigError):
        hgad_loss(z, logdet, labels, prior, stage=1, cfg=LossConfig(prior="flat"))
    with pytest.raises(ConfigError):
        hgad_loss(z, logdet, labels, None, stage=1, cfg=LossConfig())
    with pytest.raises(ConfigError):
        hgad_loss(z, logdet, None, prior, stage=1, cfg=LossConfig())


def _grads(prior: HierarchicalPrior, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    prior.zero_grad(set_to_none=True)
    loss.backward()
    return {name: (None if p.grad is None else p.grad.clone()) for name, p in prior.named_parameters()}


def test_mi_uses_detached_pi() -> None:
    z, _, labels, _, _ = _tensors()
    prior = _hand_prior()
    grads = _grads(prior, loss_mi(z, labels, prior.mu, prior.log_pi()))
    assert grads["phi"] is None
    assert grads["mu"] is not None and grads["mu"].abs().sum() > 0


def test_gradient_paths_follow_switches() -> None:
    z, logdet, labels, _, _ = _tensors()
    prior = _hand_prior()
    g_only = _grads(prior, 2.0 * loss_g(z, logdet, prior.mu, prior.log_pi()))
    no_mi = _grads(
        prior,
        hgad_loss(
            z, logdet, labels, prior, stage=1, cfg=LossConfig(lambda1=2.0, use_mi=False, use_entropy=False)
        )["total"],
    )
    torch.testing.assert_close(no_mi["mu"], g_only["mu"])
    torch.testing.assert_close(no_mi["phi"], g_only["phi"])
    with_mi = _grads(
        prior,
        hgad_loss(z, logdet, labels, prior, stage=1, cfg=LossConfig(lambda1=2.0, use_entropy=False))["total"],
    )
    assert not torch.allclose(with_mi["mu"], g_only["mu"])
    torch.testing.assert_close(with_mi["phi"], g_only["phi"])  # MI sees pi only through sg(pi)
    # stage 1 leaves the intra parameters alone; stage 2 trains them but never moves mu through them
    assert with_mi["delta"] is None and with_mi["psi"] is None
    stage2 = _grads(
        prior,
        hgad_loss(z, logdet, labels, prior, stage=2, cfg=LossConfig(lambda1=2.0, use_entropy=False))["total"],
    )
    assert stage2["delta"] is not None and stage2["delta"].abs().sum() > 0
    assert stage2["psi"] is not None and stage2["psi"].abs().sum() > 0
    torch.testing.assert_close(stage2["mu"], with_mi["mu"])
    intra_only = _grads(prior, loss_intra(z, logdet, labels, prior.intra_centres(), prior.log_w()))
    assert intra_only["mu"] is None
