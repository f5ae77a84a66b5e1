"""Normalisation statistics of the anomaly maps (docs/method.md, "Scoring").

The release subtracts, per scale, the maximum log-map over a class's whole *test* set and inverts the
summed map with its maximum over that set: transductive, so a lone image cannot be scored. The same
statistics computed once over the *training* images of each class and stored with the model make a
score depend on nothing but the image itself (``deploy`` protocol). One function serves both: it is
given the per-scale maps of a set of images and their classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hgad.errors import ConfigError
from hgad.scoring import anomaly_map, combine_scales, zscore_map

__all__ = ["MapStats", "PositionStats", "Normalisation", "SCORE_PARTS", "compute_map_stats",
           "compute_position_stats"]

# the latent maps each pixel score is made of
SCORE_PARTS = {"product": ("logp", "ent"), "logp": ("logp",), "entropy": ("ent",), "mahalanobis": ("maha",),
               "knn": ("knn",), "mahalanobis+knn": ("maha", "knn")}

_NEEDS = {"logp": "a log-likelihood map", "ent": "a model of two or more classes with the hgmm prior",
          "maha": "the class Gaussians of the latents (--latent-gauss) and the per-position statistics of the "
                  "deploy protocol (--score-norm zscore)",
          "knn": "the memory bank of training vectors (--latent-knn) and the per-position statistics of the deploy "
                 "protocol (--score-norm zscore)"}
_MIN_STD = 1e-3  # floor of a per-position standard deviation (one training image, or a constant map)


@dataclass
class MapStats:
    """Per class ``y`` and scale ``l``: ``scale_max[y, l]`` to subtract and ``s_max[y]`` to invert with."""

    scale_max: Tensor  # (Y, L)
    s_max: Tensor  # (Y,)

    def for_images(self, classes: Tensor) -> tuple[Tensor, Tensor]:
        """Gather the rows of each image's class: (B, L) maxima and (B,) inversion constants."""
        idx = classes.to(self.scale_max.device).long()
        return self.scale_max[idx], self.s_max[idx]


@dataclass
class PositionStats:
    """Per scale ``l``: mean and standard deviation ``(Y, h_l, w_l)`` of a class's maps at each position."""

    mean: list[Tensor]
    std: list[Tensor]

    def for_images(self, classes: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Gather each image's class: per scale (B, h_l, w_l) means and standard deviations."""
        idx = classes.to(self.mean[0].device).long()
        return [m[idx] for m in self.mean], [s[idx] for s in self.std]


@dataclass
class Normalisation:
    """How latent maps become anomaly maps: the statistics of each map kind and how they are applied.

    :class:`MapStats` (the release's max normalisation) make a part ``s_max - S``, clamped at 0 when
    ``clamp`` (deploy) and multiplied over parts; :class:`PositionStats` (``zscore``) make per-position
    z-scores, summed over parts. ``ent`` is None for models without an entropy map, ``maha`` for models
    without class Gaussians of the latents, ``knn`` for models without a memory bank (both are None under
    the release's max normalisation, which has neither). ``scales`` > 0 sums only that many z-scored scales,
    finest first (``score_scales``); 0 sums all (the max normalisation always combines every scale, as the
    release).
    """

    logp: MapStats | PositionStats
    ent: MapStats | PositionStats | None
    clamp: bool = False
    maha: PositionStats | None = None
    knn: PositionStats | None = None
    scales: int = 0

    def maps(self, latent: Mapping[str, Sequence[Tensor] | None], score: str, rows: Tensor, out_size: int,
             sigma: float) -> Tensor:
        """Anomaly maps (B, out, out) of pixel score ``score`` from the per-scale latent maps of each kind
        (``latent["logp"]``, ``"ent"``, ``"maha"``, ``"knn"``), each image normalised by the statistics rows
        ``rows`` (B,)."""
        total: Tensor | None = None
        for part in SCORE_PARTS[score]:
            stats, levels = getattr(self, part), latent[part]
            if stats is None or levels is None:
                raise ConfigError("--score", f"{score} needs {_NEEDS[part]}")
            if isinstance(stats, PositionStats):
                levels = levels[:self.scales] if self.scales else levels
                means, stds = stats.for_images(rows)
                one = zscore_map(levels, means, stds, out_size, sigma)
                total = one if total is None else total + one
            else:
                mx, smax = stats.for_images(rows)
                device = levels[0].device
                one = anomaly_map([m.float() for m in levels], mx.to(device), smax.to(device), out_size, sigma,
                                  self.clamp)
                total = one if total is None else total * one
        return total


def compute_map_stats(log_maps: Sequence[Tensor], classes: Tensor, n_classes: int, out_size: int,
                      chunk: int = 64) -> MapStats:
    """Statistics of per-scale log maps ``log_maps[l]`` (N, h_l, w_l) of images of ``classes`` (N,).

    Classes without images keep ``-inf``/``0`` rows; callers only gather rows of classes they have.
    """
    n_scales = len(log_maps)
    scale_max = torch.full((n_classes, n_scales), float("-inf"))
    classes = classes.cpu().long()
    for lvl, m in enumerate(log_maps):
        per_image = m.detach().float().cpu().flatten(1).amax(1)
        scale_max[:, lvl].scatter_reduce_(0, classes, per_image, reduce="amax")
    s_max = torch.zeros(n_classes)
    s_max_seen = torch.full((n_classes,), float("-inf"))
    for start in range(0, len(classes), chunk):
        sl = slice(start, start + chunk)
        cls = classes[sl]
        summed = combine_scales([m[sl].float().cpu() for m in log_maps], scale_max[cls], out_size)
        s_max_seen.scatter_reduce_(0, cls, summed.flatten(1).amax(1), reduce="amax")
    seen = torch.isfinite(s_max_seen)
    s_max[seen] = s_max_seen[seen]
    return MapStats(scale_max=scale_max, s_max=s_max)


def compute_position_stats(log_maps: Sequence[Tensor], classes: Tensor, n_classes: int
                           ) -> list[tuple[Tensor, Tensor]]:
    """Per scale: mean and standard deviation ``(Y, h_l, w_l)`` of the maps of each class's images, per position.

    The ``zscore`` deploy normalisation: a position is compared with what the class's training images
    show at that same position. Classes without images get mean 0 and std 1 (never gathered).
    """
    classes = classes.cpu().long()
    out = []
    for m in log_maps:
        m = m.detach().double().cpu()
        mean = torch.zeros(n_classes, *m.shape[1:], dtype=torch.float64)
        std = torch.ones(n_classes, *m.shape[1:], dtype=torch.float64)
        for c in range(n_classes):
            own = m[classes == c]
            if len(own):
                mean[c] = own.mean(0)
                std[c] = own.std(0, correction=0).clamp_min(_MIN_STD)
        out.append((mean.float(), std.float()))
    return out
