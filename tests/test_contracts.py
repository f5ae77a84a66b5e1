"""Contracts every loss and every score function keeps, checked on all of them at once.

For each function: finite outputs; batch independence (a batch's result equals its halves' results: the
mean of two equal halves for a loss, the concatenation for a per-vector or per-image score); float32
outputs under bfloat16 autocast; and gradients that reach exactly the inputs the method says (the
mutual-information loss stops the gradient to the class weights, the intra-class terms stop it to the main
centres, ...). A new public loss or score function must be added here (checked against ``__all__``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from hgad import losses, scoring
from hgad.losses import LossConfig, hgad_loss
from hgad.prior import HierarchicalPrior

N, D, Y, K = 16, 6, 3, 4  # vectors, dimension, classes, intra centres


@dataclass
class Case:
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    inputs: Callable[[], dict[str, torch.Tensor]]  # fresh leaf tensors (first dimension: the batch)
    grads: set[str]  # the inputs (and prior parameters) a gradient must reach; no other may get one
    kind: str  # "loss" (a mean over the batch) or "per-item" (one value per vector / image)


def _vectors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"z": torch.randn(N, D, generator=gen), "logdet": torch.randn(N, generator=gen),
            "labels": torch.arange(N) % Y}


def _prior() -> HierarchicalPrior:
    prior = HierarchicalPrior(Y, D, K, seed=1)
    with torch.no_grad():
        prior.phi.copy_(torch.tensor([0.3, -0.2, 0.1]))
        prior.psi.normal_(generator=torch.Generator().manual_seed(2))
    return prior


PRIOR_PARAMS = ("mu", "phi", "delta", "psi")


def _with_prior(fn: Callable[[dict, HierarchicalPrior], torch.Tensor]) -> Callable[[dict], torch.Tensor]:
    """A case function of the inputs' prior (its parameters are also inputs, so their gradients are read)."""
    return lambda x: fn(x, x["prior"])


def _vector_inputs() -> dict:
    prior = _prior()
    return {**_vectors(), "prior": prior, **{name: getattr(prior, name) for name in PRIOR_PARAMS}}


def _maps() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"m0": torch.randn(4, 6, 6, generator=gen), "m1": torch.randn(4, 3, 3, generator=gen),
            "maxima": torch.randn(4, 2, generator=gen), "s_max": torch.rand(4, generator=gen) + 2,
            "mean0": torch.randn(4, 6, 6, generator=gen), "mean1": torch.randn(4, 3, 3, generator=gen),
            "std0": torch.rand(4, 6, 6, generator=gen) + 0.5, "std1": torch.rand(4, 3, 3, generator=gen) + 0.5}


def _latents() -> dict[str, torch.Tensor]:
    """Per image: 5 latent vectors, the mean and root precision of the image's class, a memory bank of 7 rows."""
    gen = torch.Generator().manual_seed(4)
    return {"z": torch.randn(4, 5, D, generator=gen), "mean": torch.randn(4, D, generator=gen),
            "root": torch.eye(D) + 0.1 * torch.randn(4, D, D, generator=gen),
            "bank": torch.randn(4, 7, D, generator=gen)}


def _hgad(stage: int) -> Callable[[dict, HierarchicalPrior], torch.Tensor]:
    return lambda x, p: hgad_loss(x["z"], x["logdet"], x["labels"], p, stage=stage, cfg=LossConfig())["total"]


LOSSES = {
    "loss_g": Case(_with_prior(lambda x, p: losses.loss_g(x["z"], x["logdet"], p.mu, p.log_pi())),
                   _vector_inputs, {"z", "logdet", "mu", "phi"}, "loss"),
    "loss_mi": Case(_with_prior(lambda x, p: losses.loss_mi(x["z"], x["labels"], p.mu, p.log_pi())),
                    _vector_inputs, {"z", "mu"}, "loss"),  # stop-gradient on the class weights
    "loss_entropy": Case(_with_prior(lambda x, p: losses.loss_entropy(x["z"], p.mu)),
                         _vector_inputs, {"z", "mu"}, "loss"),
    "loss_intra": Case(_with_prior(lambda x, p: losses.loss_intra(x["z"], x["logdet"], x["labels"],
                                                                  p.intra_centres(), p.log_w())),
                       _vector_inputs, {"z", "logdet", "delta", "psi"}, "loss"),  # main centres stopped
    "loss_z": Case(_with_prior(lambda x, p: losses.loss_z(x["z"], x["logdet"], x["labels"], p.intra_centres(),
                                                          p.log_w())),
                   _vector_inputs, {"z", "logdet", "delta", "psi"}, "loss"),
    "loss_gaussian": Case(lambda x: losses.loss_gaussian(x["z"], x["logdet"]), _vectors, {"z", "logdet"}, "loss"),
    "hgad_loss-stage1": Case(_with_prior(_hgad(1)), _vector_inputs, {"z", "logdet", "mu", "phi"}, "loss"),
    "hgad_loss-stage2": Case(_with_prior(_hgad(2)), _vector_inputs, {"z", "logdet", "mu", "phi", "delta", "psi"},
                             "loss"),
}

SCORES = {
    "gaussian_log_likelihood": Case(lambda x: scoring.gaussian_log_likelihood(x["z"], x["logdet"]), _vectors,
                                    {"z", "logdet"}, "per-item"),
    "log_likelihood": Case(_with_prior(lambda x, p: scoring.log_likelihood(x["z"], x["logdet"], x["labels"],
                                                                           p.intra_centres(), p.log_w())),
                           _vector_inputs, {"z", "logdet", "delta", "psi"}, "per-item"),
    "neg_entropy": Case(_with_prior(lambda x, p: scoring.neg_entropy(x["z"], p.mu)), _vector_inputs,
                        {"z", "mu"}, "per-item"),
    "class_log_posterior": Case(_with_prior(lambda x, p: scoring.class_log_posterior(x["z"], p.mu, p.log_pi())),
                                _vector_inputs, {"z", "mu", "phi"}, "per-item"),
    "combine_scales": Case(lambda x: scoring.combine_scales([x["m0"], x["m1"]], x["maxima"], 12), _maps,
                           {"m0", "m1", "maxima"}, "per-item"),
    "anomaly_map": Case(lambda x: scoring.anomaly_map([x["m0"], x["m1"]], x["maxima"], x["s_max"], 12, 1.0),
                        _maps, {"m0", "m1", "maxima", "s_max"}, "per-item"),
    "zscore_map": Case(lambda x: scoring.zscore_map([x["m0"], x["m1"]], [x["mean0"], x["mean1"]],
                                                    [x["std0"], x["std1"]], 12, 1.0),
                       _maps, {"m0", "m1", "mean0", "mean1", "std0", "std1"}, "per-item"),
    "gaussian_blur": Case(lambda x: scoring.gaussian_blur(x["m0"], 1.0), _maps, {"m0"}, "per-item"),
    "image_scores": Case(lambda x: scoring.image_scores(x["m0"]), _maps, {"m0"}, "per-item"),
    "mahalanobis": Case(lambda x: scoring.mahalanobis(x["z"], x["mean"], x["root"]), _latents,
                        {"z", "mean", "root"}, "per-item"),
    "nearest_distance": Case(lambda x: scoring.nearest_distance(x["z"], x["bank"], chunk=3), _latents,
                             {"z", "bank"}, "per-item"),
}

CASES = {**LOSSES, **SCORES}


def test_every_loss_and_score_function_is_covered():
    loss_fns = {n for n in losses.__all__ if n.startswith("loss_")} | {"hgad_loss"}
    assert loss_fns == {n.split("-")[0] for n in LOSSES}
    # scoring's public functions that compute scores (the two checks raise, they compute nothing; the
    # class-Gaussian fit makes statistics from sums, once after training, and is tested by hand)
    score_fns = set(scoring.__all__) - {"check_finite_maps", "check_threshold", "fit_class_gaussians"}
    assert score_fns == set(SCORES)


@pytest.mark.parametrize("name", list(CASES))
def test_finite(name: str):
    case = CASES[name]
    assert bool(torch.isfinite(case.fn(case.inputs())).all())


def _half(x: dict, part: slice) -> dict:
    """The batch slice of every batched input (the prior and its parameters are not batched)."""
    return {k: v if k == "prior" or k in PRIOR_PARAMS else v[part] for k, v in x.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_batch_independent(name: str):
    case = CASES[name]
    x = case.inputs()
    n = len(x["z"] if "z" in x else x["m0"])
    first, second = slice(0, n // 2), slice(n // 2, n)
    whole = case.fn(x)
    a, b = case.fn(_half(x, first)), case.fn(_half(x, second))
    if case.kind == "loss":
        torch.testing.assert_close(whole, (a + b) / 2, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(whole, torch.cat([a, b]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_under_bfloat16_autocast(name: str):
    case = CASES[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = case.fn(case.inputs())
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_reach_exactly_the_documented_inputs(name: str):
    case = CASES[name]
    x = case.inputs()
    tensors = {k: v for k, v in x.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    for v in tensors.values():
        v.requires_grad_(True)
    case.fn(x).sum().backward()
    reached = {k for k, v in tensors.items() if v.grad is not None and bool(v.grad.abs().sum() > 0)}
    assert reached == case.grads
