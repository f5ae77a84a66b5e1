"""Anomaly scoring of HGAD (docs/method.md, "Scoring") as pure tensor functions.

Per-vector log-likelihood and negative class entropy become per-scale log-domain maps; these are
normalised by a per-image, per-scale maximum, exponentiated, upsampled and summed, turned into an
anomaly map ``s_max - S`` and blurred exactly like ``scipy.ndimage.gaussian_filter``. Every image is
processed independently, so one image's map never depends on the rest of its batch; the
normalisation statistics are inputs (from the training data, or from the test set for the paper
protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hgad.errors import ConfigError, InputError
from hgad.losses import intra_log_mixture, sq_distances
from hgad.prior import HALF_LOG_2PI

__all__ = [
    "gaussian_log_likelihood",
    "log_likelihood",
    "neg_entropy",
    "class_log_posterior",
    "fit_class_gaussians",
    "mahalanobis",
    "nearest_distance",
    "gaussian_blur",
    "combine_scales",
    "anomaly_map",
    "zscore_map",
    "image_scores",
    "check_finite_maps",
    "check_threshold",
]

def gaussian_log_likelihood(z: Tensor, logdet: Tensor) -> Tensor:
    """Per-dimension log-likelihood ``(N,)`` under the single-Gaussian prior ``N(0, I)`` (the NF baseline).

    ``[-D ln(2 pi)/2 - |z|^2/2 + logdet] / D``.
    """
    dim = z.shape[1]
    return (-dim * HALF_LOG_2PI - 0.5 * z.pow(2).sum(1) + logdet) / dim


def log_likelihood(z: Tensor, logdet: Tensor, classes: Tensor, centres: Tensor, log_w: Tensor) -> Tensor:
    """Per-dimension log-likelihood ``(N,)`` under the intra-class mixture of ``classes``.

    ``[-D ln(2 pi)/2 + logsumexp_k(-|z - c_{y,k}|^2/2 + log w_{y,k}) + logdet] / D`` with ``centres``
    ``(Y, K, D)`` and ``log_w`` ``(Y, K)``.
    """
    dim = z.shape[1]
    log_mix = intra_log_mixture(z, classes, centres, log_w)
    return (-dim * HALF_LOG_2PI + log_mix + logdet.float()) / dim


def neg_entropy(z: Tensor, mu: Tensor) -> Tensor:
    """``-H(softmax_y(-|z - mu_y|^2 / 2))`` per vector, ``(N,)``."""
    log_p = F.log_softmax(-0.5 * sq_distances(z, mu), dim=1)
    return (log_p.exp() * log_p).sum(1)


def class_log_posterior(z: Tensor, mu: Tensor, log_pi: Tensor) -> Tensor:
    """``log p(y | z)`` ``(N, Y)`` under the main mixture with class weights ``exp(log_pi)``."""
    return F.log_softmax(-0.5 * sq_distances(z, mu) + log_pi.float()[None, :], dim=1)


def fit_class_gaussians(sums: Tensor, outers: Tensor, counts: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Mean ``(Y, D)`` and root precision ``(C_y + ridge I)^(-1/2)`` ``(Y, D, D)`` of each class's vectors.

    From the sufficient statistics ``sums`` ``(Y, D)``, ``outers`` (sum of ``z z^T``, ``(Y, D, D)``) and
    ``counts`` ``(Y,)``, so that the latents never need to be held in memory at once. A class without
    vectors gets mean 0 and the identity (it is never gathered). The ridge keeps the inverse finite when
    a class has fewer vectors than dimensions.
    """
    sums, outers = sums.double(), outers.double()
    n = counts.double().clamp_min(1.0)
    mean = sums / n[:, None]
    cov = outers / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
    eye = torch.eye(sums.shape[1], dtype=torch.float64)
    eigval, eigvec = torch.linalg.eigh(cov + ridge * eye)
    root = eigvec @ torch.diag_embed(eigval.clamp_min(ridge).rsqrt()) @ eigvec.transpose(1, 2)
    empty = counts <= 0
    mean[empty] = 0.0
    root[empty] = eye
    return mean.float(), root.float()


def mahalanobis(z: Tensor, mean: Tensor, root_prec: Tensor) -> Tensor:
    """Distance ``|W (z - m)|`` ``(B, N)`` of each image's ``N`` vectors ``z`` ``(B, N, D)`` to the Gaussian of
    its class, given per image as ``mean`` ``(B, D)`` and root precision ``W`` ``(B, D, D)``."""
    with torch.autocast(z.device.type, enabled=False):  # a distance is not a bf16 quantity
        u = z.float() - mean.float()[:, None, :]
        return torch.bmm(u, root_prec.float().transpose(1, 2)).pow(2).sum(-1).sqrt()


def nearest_distance(z: Tensor, bank: Tensor, banned: Tensor | None = None, chunk: int = 1024) -> Tensor:
    """Distance ``min_j |z_i - b_j|`` ``(B, N)`` of each image's vectors ``z`` ``(B, N, D)`` to its nearest row of
    its own memory bank ``bank`` ``(B, M, D)``.

    ``banned`` ``(B, M)`` marks rows an image may not use (its own vectors, when a training image is scored
    against a bank made from it). The bank is read in chunks of ``chunk`` rows, so memory stays at
    ``B * N * chunk`` whatever ``M`` (1024 rows: the distance block of a batch stays small enough for the
    CPU's caches; 4096 was 3x slower on 8 images); the chunks are fixed by the shapes, so the graph exports to
    ONNX.
    """
    with torch.autocast(z.device.type, enabled=False):  # squared-norm expansion needs float32
        z, bank = z.float(), bank.float()
        zz = z.pow(2).sum(-1, keepdim=True)  # (B, N, 1)
        best: Tensor | None = None
        for start in range(0, int(bank.shape[1]), chunk):
            part = bank[:, start:start + chunk]
            d2 = zz - 2.0 * torch.bmm(z, part.transpose(1, 2)) + part.pow(2).sum(-1)[:, None, :]
            if banned is not None:
                d2 = d2.masked_fill(banned[:, None, start:start + chunk], float("inf"))
            low = d2.amin(-1)
            best = low if best is None else torch.minimum(best, low)
        return best.clamp_min(0.0).sqrt()


def _reflect_index(n: int, radius: int, device: torch.device) -> Tensor:
    """Source indices of an axis of length ``n`` padded by ``radius`` in scipy's 'reflect' mode.

    The extension is periodic with period ``2n`` and mirrored about the half-sample edges
    (``d c b a | a b c d | d c b a``), which also covers a radius larger than the axis.
    """
    pos = np.arange(-radius, n + radius) % (2 * n)
    pos = np.where(pos >= n, 2 * n - 1 - pos, pos)
    return torch.as_tensor(pos, dtype=torch.long, device=device)


def _gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    """Normalised 1-D Gaussian weights on ``-radius..radius`` (float64)."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_axis(x: Tensor, weights: list[float], dim: int) -> Tensor:
    """Correlate ``x`` with ``weights`` along ``dim`` after 'reflect' padding (output keeps the size).

    Written as a sum of weighted shifted slices (elementwise ops only), so each image's result is
    bitwise the same whatever the batch it sits in; a convolution kernel may pick a different
    algorithm for another batch size.
    """
    size = int(x.shape[dim])  # spatial sizes are constants of an exported graph; the batch stays dynamic
    radius = (len(weights) - 1) // 2
    padded = x.index_select(dim, _reflect_index(size, radius, x.device))
    out = padded.narrow(dim, radius, size) * weights[radius]
    for k in range(1, radius + 1):  # the kernel is symmetric: pair the taps at -k and +k
        pair = padded.narrow(dim, radius - k, size) + padded.narrow(dim, radius + k, size)
        out = out + pair * weights[radius + k]
    return out


def gaussian_blur(x: Tensor, sigma: float = 4.0, truncate: float = 4.0) -> Tensor:
    """Blur each image of ``x (B, H, W)`` like ``scipy.ndimage.gaussian_filter(img, sigma)`` (defaults).

    Separable filter of radius ``int(truncate * sigma + 0.5)`` with half-sample symmetric ('reflect')
    padding done by index selection, so the graph also exports to ONNX.
    """
    if not sigma > 0:
        raise ConfigError("sigma", f"must be > 0, got {sigma}")
    if not truncate > 0:
        raise ConfigError("truncate", f"must be > 0, got {truncate}")
    radius = int(truncate * sigma + 0.5)
    weights = _gaussian_kernel(sigma, radius).tolist()
    return _filter_axis(_filter_axis(x, weights, 1), weights, 2)


def combine_scales(log_maps: Sequence[Tensor], maxima: Tensor, out_size: int) -> Tensor:
    """``S = sum_l upsample(exp(m_l - max_l))`` ``(B, out, out)``, bilinear with ``align_corners=True``.

    ``log_maps[l]`` is ``(B, h_l, w_l)``; ``maxima`` is ``(B, n_scales)``, the value subtracted from
    scale ``l`` of each image.
    """
    if len(log_maps) == 0:
        raise ConfigError("scales", "at least one scale is needed")
    if maxima.shape[1] != len(log_maps):
        raise ConfigError("maxima", f"has {maxima.shape[1]} scales, expected {len(log_maps)}")
    total: Tensor | None = None
    for level, log_map in enumerate(log_maps):
        prob = torch.exp(log_map.float() - maxima[:, level].float()[:, None, None])
        up = F.interpolate(prob[:, None], size=(out_size, out_size), mode="bilinear", align_corners=True)[
            :, 0
        ]
        total = up if total is None else total + up
    return total


def anomaly_map(
    log_maps: Sequence[Tensor],
    maxima: Tensor,
    s_max: Tensor,
    out_size: int = 256,
    sigma: float = 4.0,
    clamp: bool = False,
) -> Tensor:
    """Anomaly map ``(B, out, out)``: ``s_max - S`` (optionally clamped at 0), then Gaussian-blurred.

    ``s_max`` is ``(B,)``; the blur is skipped when ``sigma <= 0``.
    """
    amap = s_max.float()[:, None, None] - combine_scales(log_maps, maxima, out_size)
    if clamp:
        amap = amap.clamp_min(0.0)
    if sigma > 0:
        amap = gaussian_blur(amap, sigma)
    return amap


def zscore_map(
    log_maps: Sequence[Tensor],
    means: Sequence[Tensor],
    stds: Sequence[Tensor],
    out_size: int = 256,
    sigma: float = 4.0,
) -> Tensor:
    """Anomaly map ``(B, out, out)`` from per-position standardised log maps, summed over scales, blurred.

    ``A = sum_l upsample((mean_l - m_l) / std_l)`` (bilinear, ``align_corners=True``): how many standard
    deviations each position's log-likelihood lies below what the class's training images show *at that
    position*. ``log_maps[l]``, ``means[l]`` and ``stds[l]`` are ``(B, h_l, w_l)`` (the statistics already
    gathered for each image's class). Unlike :func:`anomaly_map` nothing saturates: a vector far out of
    distribution scores higher than one just outside it.
    """
    if len(log_maps) == 0:
        raise ConfigError("scales", "at least one scale is needed")
    total: Tensor | None = None
    for log_map, mean, std in zip(log_maps, means, stds):
        z = (mean.float() - log_map.float()) / std.float()
        up = F.interpolate(z[:, None], size=(out_size, out_size), mode="bilinear", align_corners=True)[:, 0]
        total = up if total is None else total + up
    if sigma > 0:
        total = gaussian_blur(total, sigma)
    return total


def image_scores(maps: Tensor) -> Tensor:
    """Image-level score ``(B,)``: the maximum of each map."""
    return maps.flatten(1).amax(dim=1)


def check_finite_maps(maps: Tensor | np.ndarray, source: str, what: str = "the scored images") -> None:
    """Non-finite anomaly maps are a damaged model or statistics, never "normal": stop with one line."""
    values = torch.as_tensor(maps)
    if not bool(torch.isfinite(values).all()):
        raise InputError(source, f"the model gives non-finite (NaN/inf) anomaly scores for {what}; its weights "
                                 "or stored statistics are damaged (retrain, or restore the run)")


def check_threshold(value: float, class_name: str, source: str) -> None:
    """A stored threshold that is not finite would call every image normal (inf) or none (nan)."""
    if not np.isfinite(value):
        raise InputError(source, f"stored decision threshold of class {class_name!r} is {value}, not a finite "
                                 "number (calibration did not finish or the run is damaged); give --threshold "
                                 "or retrain")
