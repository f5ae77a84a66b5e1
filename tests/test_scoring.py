"""Tests of the scoring functions: per-vector scores by hand, blur against scipy, map assembly by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from hgad.errors import ConfigError
from hgad.scoring import (
    anomaly_map,
    class_log_posterior,
    combine_scales,
    gaussian_blur,
    gaussian_log_likelihood,
    image_scores,
    log_likelihood,
    neg_entropy,
)
from worked_example import CENTRES, D_INTRA, D_MAIN, LOGDET, MU, PI, W, Z
from worked_example import LABELS as CLASSES


def test_gaussian_log_likelihood_by_hand() -> None:
    out = gaussian_log_likelihood(torch.tensor(Z), torch.tensor(LOGDET))
    expected = [(-2 * 0.5 * math.log(2 * math.pi) - 0.5 * (z[0] ** 2 + z[1] ** 2) + ld) / 2 for z, ld in zip(Z, LOGDET)]
    assert out.shape == (3,)
    assert out.tolist() == pytest.approx(expected, rel=1e-6)


def test_log_likelihood_by_hand() -> None:
    out = log_likelihood(
        torch.tensor(Z),
        torch.tensor(LOGDET),
        torch.tensor(CLASSES),
        torch.tensor(CENTRES),
        torch.log(torch.tensor(W)),
    )
    expected = []
    for d, y, ld in zip(D_INTRA, CLASSES, LOGDET):
        mix = math.log(W[y][0] * math.exp(-d[0] / 2) + W[y][1] * math.exp(-d[1] / 2))
        expected.append((-2 * 0.5 * math.log(2 * math.pi) + mix + ld) / 2)
    assert out.shape == (3,)
    assert out.tolist() == pytest.approx(expected, rel=1e-6)


def test_neg_entropy_and_posterior_by_hand() -> None:
    z, mu = torch.tensor(Z), torch.tensor(MU)
    ent, post = [], []
    for d in D_MAIN:
        e = [math.exp(-d[0] / 2), math.exp(-d[1] / 2)]
        p = [v / sum(e) for v in e]
        ent.append(sum(v * math.log(v) for v in p))
        joint = [PI[0] * e[0], PI[1] * e[1]]
        post.append([math.log(j / sum(joint)) for j in joint])
    assert neg_entropy(z, mu).tolist() == pytest.approx(ent, rel=1e-6)
    got = class_log_posterior(z, mu, torch.log(torch.tensor(PI)))
    assert got.shape == (3, 2)
    for row, exp_row in zip(got.tolist(), post):
        assert row == pytest.approx(exp_row, rel=1e-6)
    # a vector on a centre is the least uncertain
    assert neg_entropy(mu, mu).tolist() == pytest.approx([-_binary_entropy(1 / (1 + math.exp(-1)))] * 2)


def _binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


@pytest.mark.parametrize(
    ("shape", "sigma"), [((20, 23), 4.0), ((64, 64), 1.5), ((64, 64), 4.0), ((5, 7), 4.0)]
)
def test_gaussian_blur_matches_scipy(shape: tuple[int, int], sigma: float) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(2, *shape))
    expected = np.stack([gaussian_filter(img, sigma) for img in imgs])
    got64 = gaussian_blur(torch.from_numpy(imgs), sigma).numpy()
    np.testing.assert_allclose(got64, expected, rtol=0, atol=1e-12)
    got32 = gaussian_blur(torch.from_numpy(imgs).float(), sigma).numpy()
    np.testing.assert_allclose(got32, expected, rtol=0, atol=1e-5)


def test_gaussian_blur_rejects_bad_sigma() -> None:
    with pytest.raises(ConfigError):
        gaussian_blur(torch.zeros(1, 4, 4), 0.0)


def _two_scale_example() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two images, scales 2x2 and 4x4, with maxima chosen so exp(m - max) is a known linear ramp."""
    small = torch.stack(
        [
            torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]])) + 0.5,  # max 0.5 -> [[1, 2], [3, 4]]
            torch.full((2, 2), math.log(4.0) - 1.0),  # max -1 + ln 2 -> 2 everywhere
        ]
    )
    ramp = (4 * torch.arange(4.0)[:, None] + torch.arange(4.0)[None, :] + 1) / 16  # (4r + c + 1) / 16
    large = torch.stack([torch.log(ramp), torch.zeros(4, 4)])  # max 0 -> ramp; max 0 -> 1 everywhere
    maxima = torch.tensor([[0.5, 0.0], [-1.0 + math.log(2.0), 0.0]])
    return [small, large], maxima


def test_combine_scales_by_hand() -> None:
    maps, maxima = _two_scale_example()
    s = combine_scales(maps, maxima, 3)
    # align_corners: output pixel j samples input position j * (n - 1) / 2; both inputs are linear ramps
    small0 = [[1.0, 1.5, 2.0], [2.0, 2.5, 3.0], [3.0, 3.5, 4.0]]
    large0 = [[(4 * r + c + 1) / 16 for c in (0.0, 1.5, 3.0)] for r in (0.0, 1.5, 3.0)]
    expected0 = torch.tensor(small0) + torch.tensor(large0)
    torch.testing.assert_close(s[0], expected0)
    torch.testing.assert_close(s[1], torch.full((3, 3), 3.0))
    # at a larger size the corners are the input corners
    big = combine_scales(maps, maxima, 256)[0]
    assert big[0, 0].item() == pytest.approx(1.0 + 1 / 16)
    assert big[0, -1].item() == pytest.approx(2.0 + 4 / 16)
    assert big[-1, 0].item() == pytest.approx(3.0 + 13 / 16)
    assert big[-1, -1].item() == pytest.approx(4.0 + 16 / 16)


def test_anomaly_map_and_image_scores_by_hand() -> None:
    maps, maxima = _two_scale_example()
    s_max = torch.tensor([10.0, 2.0])
    s0 = combine_scales(maps, maxima, 3)
    amap = anomaly_map(maps, maxima, s_max, out_size=3, sigma=0.0)
    torch.testing.assert_close(amap[0], 10.0 - s0[0])
    torch.testing.assert_close(amap[1], torch.full((3, 3), -1.0))
    clamped = anomaly_map(maps, maxima, s_max, out_size=3, sigma=0.0, clamp=True)
    torch.testing.assert_close(clamped[1], torch.zeros(3, 3))
    torch.testing.assert_close(clamped[0], amap[0])
    scores = image_scores(amap)
    assert scores.tolist() == pytest.approx([10.0 - (1.0 + 1 / 16), -1.0])
    # blurred map = scipy's gaussian_filter of the unblurred one
    blurred = anomaly_map(maps, maxima, s_max, out_size=40, sigma=4.0)
    raw = anomaly_map(maps, maxima, s_max, out_size=40, sigma=0.0)
    for b in range(2):
        np.testing.assert_allclose(
            blurred[b].numpy(), gaussian_filter(raw[b].double().numpy(), 4.0), atol=1e-5
        )


def test_single_image_equals_batch_row() -> None:
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(4, n, n, generator=gen) for n in (16, 8, 4)]
    maxima = torch.stack([m.flatten(1).amax(1) for m in maps], dim=1) + torch.rand(4, 3, generator=gen)
    s_max = torch.rand(4, generator=gen) * 3 + 2
    batch = anomaly_map(maps, maxima, s_max, out_size=64)
    for b in range(4):
        alone = anomaly_map([m[b : b + 1] for m in maps], maxima[b : b + 1], s_max[b : b + 1], out_size=64)
        assert torch.equal(alone[0], batch[b])
    assert torch.equal(image_scores(batch)[1:2], image_scores(batch[1:2]))
