"""The HGAD torch model: frozen backbone, one conditional flow and one prior per scale.

Kept apart from training (``hgad.training``) and from dataset-level evaluation (``hgad.evaluation``):
this module turns images or cached features into latent vectors, losses and per-scale maps, and holds
the deploy-protocol statistics that make single-image scoring possible.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hgad.backbone import FeatureExtractor
from hgad.config import HGADConfig
from hgad.data import IMAGENET_NORM
from hgad.errors import ConfigError
from hgad.flow import ConditionalFlow, positional_encoding_2d
from hgad.losses import LossConfig, hgad_loss
from hgad.map_stats import SCORE_PARTS, MapStats, Normalisation, PositionStats
from hgad.prior import HierarchicalPrior
from hgad.scoring import (
    class_log_posterior,
    fit_class_gaussians,
    gaussian_log_likelihood,
    image_scores,
    log_likelihood,
    mahalanobis,
    nearest_distance,
    neg_entropy,
)

__all__ = ["HGAD", "LatentMaps", "ScoredBatch"]

_WHITEN_EPS = 0.01  # ridge on the feature covariance before whitening (features have variances ~0.1-1)
_LATENT_RIDGE = 0.01  # ridge on each class's latent covariance (latents have variances ~1)
_BANK = "knn_bank"  # buffer name prefix of the memory bank
_MAX_BANK_BYTES = 2 ** 31  # an ONNX graph cannot hold more; far above what a CPU model should carry


@dataclass
class LatentMaps:
    """Per-scale maps of a batch of images, before normalisation."""

    logp: list[Tensor]  # per scale (B, h, w): per-dimension log-likelihood
    ent: list[Tensor] | None  # per scale (B, h, w): negative entropy of the class posterior
    posterior: Tensor | None  # (B, Y) image-mean class posterior p(y|z)
    classes: Tensor  # (B,) class whose intra-class mixture scored each image
    class_maps: list[Tensor] | None = None  # per scale (B, h, w): most probable class of each vector
    maha: list[Tensor] | None = None  # per scale (B, h, w): minus the latent's distance to its class Gaussian
    knn: list[Tensor] | None = None  # per scale (B, h, w): minus the distance to the nearest banked vector

    def to(self, device: torch.device | str) -> LatentMaps:
        """The same maps on ``device``."""
        def move(maps: list[Tensor] | None) -> list[Tensor] | None:
            return None if maps is None else [m.to(device) for m in maps]

        return LatentMaps(logp=move(self.logp), ent=move(self.ent),
                          posterior=None if self.posterior is None else self.posterior.to(device),
                          classes=self.classes.to(device), class_maps=move(self.class_maps), maha=move(self.maha),
                          knn=move(self.knn))


@dataclass
class ScoredBatch:
    """Scores of a batch of images: what every scorer (Detector, evaluate, ONNX, calibrate) reads."""

    maps: Tensor  # (B, M, M) anomaly maps
    scores: Tensor  # (B,) image scores: the maximum of each map
    classes: Tensor  # (B,) int64 class whose model scored each image
    posterior: Tensor | None  # (B, Y) image-mean class posterior (None for a single-Gaussian prior)
    confidence: Tensor  # (B,) posterior of the scoring class (NaN without a posterior)


class HGAD(nn.Module):
    """Unified anomaly detector over ``class_names``; see docs/method.md."""

    def __init__(self, cfg: HGADConfig, class_names: list[str], backbone: FeatureExtractor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.class_names = list(class_names)
        self.backbone = backbone if backbone is not None else FeatureExtractor(
            cfg.backbone, mode=cfg.feature_mode, taps=cfg.taps, levels=cfg.pyramid_levels,
            weights=cfg.backbone_weights, pool=cfg.feature_pool)
        self.backbone.check_img_size(cfg.img_size)
        self.input_norm = self.backbone.norm if cfg.input_norm == "backbone" else IMAGENET_NORM
        n_classes = len(self.class_names)
        dims = self.backbone.feature_dims
        torch.manual_seed(cfg.seed)  # subnet init draws from the global generator
        self.flows = nn.ModuleList(
            ConditionalFlow(d, cfg.pos_dim, cfg.n_blocks, clamp=cfg.clamp, seed=cfg.seed * 100 + lvl)
            for lvl, d in enumerate(dims))
        self.priors = nn.ModuleList(
            HierarchicalPrior(n_classes, d, cfg.n_intra, seed=cfg.seed * 100 + lvl) for lvl, d in enumerate(dims)
        ) if cfg.prior == "hgmm" else None
        self.loss_cfg = LossConfig(lambda1=cfg.lambda1, lambda2=cfg.lambda2, use_mi=cfg.use_mi,
                                   use_entropy=cfg.use_entropy, use_intra=cfg.n_intra > 1,
                                   prior=cfg.prior)
        n_scales = len(dims)
        # deploy-protocol statistics (docs/method.md, "Scoring"), filled by calibrate(); saved with the weights
        self.register_buffer("logp_max", torch.zeros(n_classes, n_scales))
        self.register_buffer("logp_smax", torch.zeros(n_classes))
        self.register_buffer("ent_max", torch.zeros(n_classes, n_scales))
        self.register_buffer("ent_smax", torch.zeros(n_classes))
        self.register_buffer("threshold", torch.full((n_classes,), float("inf")))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        if cfg.score_norm == "zscore":  # per class and position statistics of the training maps (calibrate)
            kinds = ("logp", "ent") + ("maha",) * cfg.latent_gauss + ("knn",) * bool(cfg.latent_knn)
            for lvl, (h, w) in enumerate(self.backbone.scale_shapes(cfg.img_size)):
                for kind in kinds:
                    self.register_buffer(f"z_{kind}_mean{lvl}", torch.zeros(n_classes, h, w))
                    self.register_buffer(f"z_{kind}_std{lvl}", torch.ones(n_classes, h, w))
        if cfg.latent_gauss:  # each class's Gaussian of the training latents, set by set_latent_stats()
            for lvl, d in enumerate(dims):
                self.register_buffer(f"lat_mean{lvl}", torch.zeros(n_classes, d))
                self.register_buffer(f"lat_root{lvl}", torch.eye(d).repeat(n_classes, 1, 1))
        if cfg.latent_knn:  # each class's sample of training vectors (knn_space), set by set_knn_bank()
            shapes = list(zip(self.backbone.scale_shapes(cfg.img_size), dims))
            rows = cfg.latent_knn * (1 + cfg.knn_hflip)  # images' worth of rows: each copy's share
            size = 4 * n_classes * rows * sum(h * w * d for (h, w), d in shapes)
            if size > _MAX_BANK_BYTES:
                copies = " (twice: --knn-hflip)" if cfg.knn_hflip else ""
                lower = "--latent-knn or --img-size" + (", or drop --knn-hflip" if cfg.knn_hflip else "")
                raise ConfigError("--latent-knn", f"{cfg.latent_knn} images' worth of vectors{copies} for {n_classes} "
                                  f"classes at --img-size {cfg.img_size} is a {size / 2 ** 30:.1f} GiB memory bank (at "
                                  f"most {_MAX_BANK_BYTES / 2 ** 30:.0f} GiB); lower {lower}")
            for lvl, ((h, w), d) in enumerate(shapes):
                self.register_buffer(f"{_BANK}{lvl}", torch.zeros(n_classes, rows * h * w, d))
        self._knn_owner: list[Tensor] | None = None  # (Y, M) training image of each bank row, while calibrating
        if cfg.whiten:  # mean and whitening matrix of the training features, set by set_feature_stats()
            for lvl, d in enumerate(dims):
                self.register_buffer(f"feat_mean{lvl}", torch.zeros(d))
                self.register_buffer(f"feat_whiten{lvl}", torch.eye(d))
        self._pos_cache: dict[tuple[int, int, str], Tensor] = {}

    # ---- parameters and state -------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        """Number of classes of the unified model."""
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        """Where the model's state lives."""
        return self.logp_max.device

    def train(self, mode: bool = True) -> HGAD:
        """Train mode for flows and prior; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.train(False)  # frozen: batch-norm statistics never move
        return self

    def trainable_state(self) -> dict[str, Tensor]:
        """Everything but the backbone (whose weights are named by the config)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def resume_state(self) -> dict[str, Tensor]:
        """What a resume checkpoint needs: :meth:`trainable_state` without the memory bank, which is only
        filled after training (tens of MB of zeros otherwise, written after every pass)."""
        return {k: v for k, v in self.trainable_state().items() if not k.startswith(_BANK)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Flows with weight decay, prior without (docs/method.md, "Training schedule")."""
        groups = [{"params": [p for p in self.flows.parameters() if p.requires_grad],
                   "weight_decay": weight_decay, "name": "flows"}]
        if self.priors is not None:
            groups.append({"params": list(self.priors.parameters()), "weight_decay": 0.0, "name": "prior"})
        return groups

    def flow_parameter_counts(self) -> list[int]:
        """Trainable parameters of each scale's flow."""
        return [sum(p.numel() for p in f.parameters() if p.requires_grad) for f in self.flows]

    # ---- features to vectors ----------------------------------------------------------------
    def extract(self, images: Tensor) -> list[Tensor]:
        """Per-scale backbone features (B, D_l, h_l, w_l) of preprocessed images."""
        return self.backbone(images.to(self.device))

    def _positions(self, h: int, w: int, device: torch.device) -> Tensor:
        h, w = int(h), int(w)  # plain ints even while tracing, so the encoding is a graph constant
        key = (h, w, str(device))
        if key not in self._pos_cache:
            pe = positional_encoding_2d(self.cfg.pos_dim, h, w)
            self._pos_cache[key] = pe.flatten(1).t().contiguous().to(device)  # (h*w, P)
        return self._pos_cache[key]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def flow_input(self, feat: Tensor, level: int) -> Tensor:
        """What the flow of scale ``level`` reads: features (B, D, h, w) -> vectors (B*h*w, D) float32, whitened
        when ``whiten``."""
        b, d, h, w = feat.shape
        x = feat.to(self.device, torch.float32).permute(0, 2, 3, 1).reshape(b * h * w, d)
        if self.cfg.whiten:
            x = F.linear(x - getattr(self, f"feat_mean{level}"), getattr(self, f"feat_whiten{level}"))
        return x

    def encode(self, feat: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """Flow of scale ``level``: features (B, D, h, w) -> z (B*h*w, D) float32 and log-det (B*h*w,)."""
        h, w = feat.shape[2:]
        x = self.flow_input(feat, level)
        c = self._positions(h, w, x.device)  # (h*w, P), shared by the b images (not repeated)
        with self._autocast():
            z, logdet = self.flows[level](x, c)
        return z.float(), logdet.float()

    @torch.no_grad()
    def set_feature_stats(self, batches) -> None:
        """Mean and ZCA whitening matrix ``(C + eps I)^(-1/2)`` of the training features (``batches`` yields
        per-scale feature lists), used by ``whiten``; a no-op without it.

        Whitened input makes the untrained flow a Gaussian of the features' own covariance (the
        Mahalanobis distance of a unified Gaussian yardstick) instead of ``N(0, I)`` on raw features, so a
        short schedule starts from a sensible density; the constant log-determinant of this fixed map
        is left out (it cancels in every normalised score).
        """
        if not self.cfg.whiten:
            return
        sums: list[Tensor] = []
        outer: list[Tensor] = []
        count = [0] * len(self.flows)
        for feats in batches:
            for lvl, f in enumerate(feats):
                x = f.to("cpu", torch.float64).permute(0, 2, 3, 1).flatten(0, 2)  # (B*h*w, D)
                if lvl == len(sums):
                    sums.append(x.sum(0))
                    outer.append(x.T @ x)
                else:
                    sums[lvl] += x.sum(0)
                    outer[lvl] += x.T @ x
                count[lvl] += x.shape[0]
        for lvl, (s1, s2) in enumerate(zip(sums, outer)):
            mean = s1 / count[lvl]
            cov = s2 / count[lvl] - torch.outer(mean, mean)
            eigval, eigvec = torch.linalg.eigh(cov + _WHITEN_EPS * torch.eye(len(mean), dtype=cov.dtype))
            whiten = eigvec @ torch.diag(eigval.clamp_min(_WHITEN_EPS).rsqrt()) @ eigvec.T
            getattr(self, f"feat_mean{lvl}").copy_(mean.float())
            getattr(self, f"feat_whiten{lvl}").copy_(whiten.float())

    # ---- training -----------------------------------------------------------------------------
    def loss(self, feats: list[Tensor], labels: Tensor, stage: int) -> dict[str, Tensor]:
        """Loss terms summed over scales (scales have disjoint parameters, docs/method.md, "Training objective")."""
        total: dict[str, Tensor] = {}
        labels = labels.to(self.device).long()
        for lvl, feat in enumerate(feats):
            z, logdet = self.encode(feat, lvl)
            vec_labels = labels.repeat_interleave(feat.shape[2] * feat.shape[3])
            prior = self.priors[lvl] if self.priors is not None else None
            for name, value in hgad_loss(z, logdet, vec_labels, prior, stage=stage, cfg=self.loss_cfg).items():
                total[name] = total[name] + value if name in total else value
        return total

    # ---- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def latent_maps(self, feats: list[Tensor], classes: Tensor | None = None, *,
                    images: Tensor | None = None, knn: bool = True) -> LatentMaps:
        """Per-scale log-likelihood and negative-entropy maps (and the class-Gaussian and memory-bank maps
        where the model has them).

        ``classes`` given: the known-class protocol; ``None``: each image is scored under the class
        of highest image-mean posterior (docs/method.md, "Which class scores an image"). ``images``
        (B,): indices of training images in the memory bank being calibrated, whose own rows they may not
        use (see :meth:`set_knn_bank`). ``knn=False`` skips the memory-bank maps (a nearest-row search
        per vector) when the score does not read them.
        """
        b = feats[0].shape[0]
        zs = [self.encode(f, lvl) for lvl, f in enumerate(feats)]
        shapes = [f.shape[2:] for f in feats]
        if self.priors is None:
            logp = [gaussian_log_likelihood(z, logdet).view(b, h, w) for (z, logdet), (h, w) in zip(zs, shapes)]
            cls = (classes if classes is not None else torch.zeros(b, dtype=torch.long)).to(self.device).long()
            return LatentMaps(logp=logp, ent=None, posterior=None, classes=cls, maha=self._maha(zs, shapes, cls),
                              knn=self._knn(feats, zs, cls, images, knn))
        post = torch.zeros(b, self.n_classes, device=self.device)
        count = 0
        class_maps = []
        for (z, _), prior, (h, w) in zip(zs, self.priors, shapes):
            lp = class_log_posterior(z, prior.mu, prior.log_pi())
            post += lp.exp().view(b, h * w, -1).sum(1)
            class_maps.append(lp.argmax(1).view(b, h, w))
            count += h * w
        post /= count
        cls = (classes.to(self.device).long() if classes is not None else post.argmax(1))
        logp, ent = [], []
        for (z, logdet), prior, (h, w) in zip(zs, self.priors, shapes):
            vec_cls = cls.repeat_interleave(h * w)
            logp.append(log_likelihood(z, logdet, vec_cls, prior.intra_centres(), prior.log_w()).view(b, h, w))
            ent.append(neg_entropy(z, prior.mu).view(b, h, w))
        return LatentMaps(logp=logp, ent=ent, posterior=post, classes=cls, class_maps=class_maps,
                          maha=self._maha(zs, shapes, cls), knn=self._knn(feats, zs, cls, images, knn))

    def _maha(self, zs: list[tuple[Tensor, Tensor]], shapes: list, cls: Tensor) -> list[Tensor] | None:
        """Per scale (B, h, w): minus the distance of each latent to its image's class Gaussian (a log-map:
        higher is more normal, like ``logp``); ``None`` without ``latent_gauss``."""
        if not self.cfg.latent_gauss:
            return None
        out = []
        for lvl, ((z, _), (h, w)) in enumerate(zip(zs, shapes)):
            mean, root = getattr(self, f"lat_mean{lvl}")[cls], getattr(self, f"lat_root{lvl}")[cls]
            # batch size as -1: an ONNX trace keeps it dynamic
            out.append(-mahalanobis(z.view(-1, int(h) * int(w), z.shape[1]), mean, root).view(-1, int(h), int(w)))
        return out

    def bank_vectors(self, feat: Tensor, level: int, z: Tensor | None = None) -> Tensor:
        """The vectors (B*h*w, D) of scale ``level`` that the memory bank holds and the knn score compares
        (``knn_space``): the flow's input, or its latents ``z`` (computed when not given)."""
        if self.cfg.knn_space == "input":
            return self.flow_input(feat, level)
        return self.encode(feat, level)[0] if z is None else z

    def _knn(self, feats: list[Tensor], zs: list[tuple[Tensor, Tensor]], cls: Tensor, images: Tensor | None,
             wanted: bool) -> list[Tensor] | None:
        """Per scale (B, h, w): minus the distance of each vector to the nearest row of its class's memory bank
        (higher is more normal); ``None`` without ``latent_knn`` or when not ``wanted``."""
        if not (wanted and self.cfg.latent_knn):
            return None
        out = []
        for lvl, (f, (z, _)) in enumerate(zip(feats, zs)):
            h, w = f.shape[2:]
            v = self.bank_vectors(f, lvl, z)  # the flow's input or its latents, as the bank holds
            banned = None
            if images is not None:
                if self._knn_owner is None:
                    raise RuntimeError("images given outside the calibration of the memory bank")
                banned = self._knn_owner[lvl].to(cls.device)[cls] == images.to(cls.device).view(-1, 1)
                banned &= ~banned.all(1, keepdim=True)  # a class of one image: nothing else to compare with
            bank = getattr(self, f"{_BANK}{lvl}")[cls]
            out.append(-nearest_distance(v.view(-1, int(h) * int(w), v.shape[1]), bank, banned
                                         ).view(-1, int(h), int(w)))
        return out

    @torch.no_grad()
    def set_knn_bank(self, batches) -> None:
        """Fill each class's memory bank with a random sample of its training vectors (``latent_knn``, of the
        ``knn_space``: the flow's input or its latents).

        ``batches`` yields ``(per-scale features, labels, image indices)`` of the training images (and, with
        ``knn_hflip``, of their mirrored copies under the same indices: a training image's search then leaves
        out both its copies). The
        non-parametric counterpart of the class Gaussian: a vector far from every training vector of its
        class is anomalous even where the Gaussian's ellipsoid covers it. A class with fewer vectors than
        the bank holds repeats them (a repeated row never changes a nearest distance). Which training image
        each row came from is kept until :meth:`forget_knn_owners`, so that calibration can score a training
        image against a bank without its own vectors (else its distances are zero).
        """
        if not self.cfg.latent_knn:
            return
        gen = torch.Generator().manual_seed(self.cfg.seed)
        # per scale and class: the kept rows, their random keys and owners; a row is kept while its key is
        # among the bank size smallest of its class (a uniform sample without holding every latent)
        kept: list[dict[int, tuple[Tensor, Tensor, Tensor]]] = []
        for feats, labels, images in batches:
            labels, images = labels.cpu().long(), images.cpu().long()
            for lvl, f in enumerate(feats):
                if lvl == len(kept):
                    kept.append({})
                size = getattr(self, f"{_BANK}{lvl}").shape[1]
                v = self.bank_vectors(f, lvl).cpu().view(len(labels), -1, f.shape[1])
                for c in labels.unique().tolist():
                    own = labels == c
                    rows = v[own].reshape(-1, v.shape[-1])
                    owner = images[own].repeat_interleave(v.shape[1])
                    keys = torch.rand(len(rows), generator=gen)
                    if c in kept[lvl]:
                        old_rows, old_keys, old_owner = kept[lvl][c]
                        rows, keys, owner = (torch.cat([old_rows, rows]), torch.cat([old_keys, keys]),
                                             torch.cat([old_owner, owner]))
                    top = keys.topk(min(size, len(keys)), largest=False).indices
                    kept[lvl][c] = (rows[top], keys[top], owner[top])
        owners = []
        for lvl, classes in enumerate(kept):
            bank = getattr(self, f"{_BANK}{lvl}")
            bank.zero_()  # a class without training images keeps no rows of an earlier calibration
            owner = torch.full(bank.shape[:2], -1, dtype=torch.long)
            for c, (rows, _, row_owner) in classes.items():
                pick = torch.arange(bank.shape[1]) % len(rows)  # repeat when the class has fewer rows
                bank[c].copy_(rows[pick].to(bank.device))
                owner[c] = row_owner[pick]
            owners.append(owner)
        self._knn_owner = owners

    def forget_knn_owners(self) -> None:
        """Drop the calibration-only record of which training image each bank row came from."""
        self._knn_owner = None

    @torch.no_grad()
    def set_latent_stats(self, batches) -> None:
        """Fit each class's Gaussian of the latents (``latent_gauss``; docs/method.md, "Scoring").

        ``batches`` yields ``(per-scale features, labels)`` of the training images. The hierarchical prior
        models a class with isotropic components; its covariance, fitted once after training, lets the
        ``mahalanobis`` score see directions in which a class's latents barely vary.
        """
        if not self.cfg.latent_gauss:
            return
        y = self.n_classes
        sums: list[Tensor] = []
        outers: list[Tensor] = []
        counts: list[Tensor] = []
        for feats, labels in batches:
            labels = labels.cpu().long()
            for lvl, f in enumerate(feats):
                d = f.shape[1]
                z = self.encode(f, lvl)[0].cpu().double().view(len(labels), -1, d)
                if lvl == len(sums):
                    sums.append(torch.zeros(y, d, dtype=torch.float64))
                    outers.append(torch.zeros(y, d, d, dtype=torch.float64))
                    counts.append(torch.zeros(y, dtype=torch.float64))
                sums[lvl].index_add_(0, labels, z.sum(1))
                outers[lvl].index_add_(0, labels, z.transpose(1, 2) @ z)
                counts[lvl].index_add_(0, labels, torch.full((len(labels),), float(z.shape[1]), dtype=torch.float64))
        for lvl, (s1, s2, n) in enumerate(zip(sums, outers, counts)):
            mean, root = fit_class_gaussians(s1, s2, n, _LATENT_RIDGE)
            getattr(self, f"lat_mean{lvl}").copy_(mean)
            getattr(self, f"lat_root{lvl}").copy_(root)

    def set_stats(self, logp: MapStats, ent: MapStats | None) -> None:
        """Store the deploy-protocol max statistics and mark the model calibrated."""
        self.logp_max.copy_(logp.scale_max)
        self.logp_smax.copy_(logp.s_max)
        if ent is not None:
            self.ent_max.copy_(ent.scale_max)
            self.ent_smax.copy_(ent.s_max)
        self.calibrated.fill_(True)

    def set_position_stats(self, kind: str, stats: list[tuple[Tensor, Tensor]]) -> None:
        """Store per-position statistics (see :func:`hgad.map_stats.compute_position_stats`) of one map kind
        (``logp``, ``ent``, ``maha`` or ``knn``)."""
        for lvl, (mean, std) in enumerate(stats):
            getattr(self, f"z_{kind}_mean{lvl}").copy_(mean)
            getattr(self, f"z_{kind}_std{lvl}").copy_(std)

    def deploy_norm(self, scales: int | None = None) -> Normalisation:
        """The deploy protocol's normalisation: the statistics stored at training (``score_norm`` says which).
        ``scales``: sum the z-maps of this many finest scales (0: all) instead of the run's ``score_scales``."""
        if scales is not None:
            if self.cfg.score_norm != "zscore":
                raise ConfigError("--score-scales", "needs a model trained with --score-norm zscore (the max "
                                                    "normalisation always combines every scale)")
            if not 0 <= scales <= len(self.flows):
                raise ConfigError("--score-scales", f"must be 0 (all) to {len(self.flows)} (the scales there are), "
                                                    f"got {scales}")
        if self.cfg.score_norm == "zscore":
            def positions(kind: str) -> PositionStats:
                n = len(self.flows)
                return PositionStats([getattr(self, f"z_{kind}_mean{lvl}") for lvl in range(n)],
                                     [getattr(self, f"z_{kind}_std{lvl}") for lvl in range(n)])

            return Normalisation(positions("logp"), positions("ent"),
                                 maha=positions("maha") if self.cfg.latent_gauss else None,
                                 knn=positions("knn") if self.cfg.latent_knn else None,
                                 scales=self.cfg.score_scales if scales is None else scales)
        return Normalisation(MapStats(self.logp_max, self.logp_smax), MapStats(self.ent_max, self.ent_smax),
                             clamp=True)

    def score_kind(self, score: str | None = None) -> str:
        """The pixel score used: ``score`` or the configured one, with ``product`` falling back to ``logp``
        when the entropy map carries nothing (one class: the class posterior is certain everywhere, so its
        entropy is identically zero; a single-Gaussian prior has no posterior at all)."""
        kind = score or self.cfg.score
        if kind not in SCORE_PARTS:
            raise ConfigError("--score", f"must be one of {', '.join(SCORE_PARTS)}; got {kind!r}")
        parts = SCORE_PARTS[kind]
        if "maha" in parts and not self.cfg.latent_gauss:
            raise ConfigError("--score", f"{kind} needs a model trained with --latent-gauss")
        if "knn" in parts and not self.cfg.latent_knn:
            raise ConfigError("--score", f"{kind} needs a model trained with --latent-knn N > 0")
        if "maha" in parts or "knn" in parts:  # need no class posterior: no fallback
            return kind
        if kind != "logp" and (self.priors is None or self.n_classes == 1):
            if kind == "entropy":
                raise ConfigError("--score", "entropy needs a model of two or more classes with the hgmm prior")
            return "logp"
        return kind

    def reads_knn(self, score: str | None = None) -> bool:
        """Whether pixel score ``score`` (default: the configured one) reads the memory-bank map, whose search
        :meth:`latent_maps` can then skip."""
        return "knn" in SCORE_PARTS[self.score_kind(score)]

    @torch.no_grad()
    def score(self, feats: list[Tensor], *, score: str, norm: Normalisation, classes: Tensor | None = None
              ) -> ScoredBatch:
        """Features to anomaly maps, image scores, class and posterior: the one scoring path (docs/method.md,
        "Scoring"). ``classes`` fixes the class of each image (else inferred, see :meth:`latent_maps`)."""
        return self.score_latent(self.latent_maps(feats, classes, knn=self.reads_knn(score)), score=score, norm=norm)

    def score_latent(self, lm: LatentMaps, *, score: str, norm: Normalisation,
                     stat_classes: Tensor | None = None) -> ScoredBatch:
        """:class:`ScoredBatch` of latent maps normalised by ``norm`` (rows of ``stat_classes``, default: the
        classes that scored the images) with pixel score ``score`` (see :meth:`score_kind`)."""
        kind = self.score_kind(score)
        rows = lm.classes if stat_classes is None else stat_classes
        latent = {"logp": lm.logp, "ent": lm.ent, "maha": lm.maha, "knn": lm.knn}
        maps = norm.maps(latent, kind, rows, self.cfg.map_size, self.cfg.blur_sigma)
        scores = image_scores(maps)
        classes = lm.classes.long()
        if lm.posterior is None:
            confidence = torch.full_like(scores, float("nan"))
        else:
            confidence = lm.posterior.gather(1, classes[:, None])[:, 0]
        return ScoredBatch(maps=maps, scores=scores, classes=classes, posterior=lm.posterior, confidence=confidence)
