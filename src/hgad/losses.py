"""Training objectives of HGAD (docs/method.md, "Training objective"): pure functions of latents and prior parameters.

Every loss is the mean over vectors of a per-vector term, computed in float32 (inputs in bf16/fp16
are upcast at entry and autocast is switched off for the distance matmul) with log-sum-exp forms
for stability. :func:`hgad_loss` assembles the stage-1 / stage-2 objective; switched-off terms are
never computed, so they cannot contribute gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hgad.errors import ConfigError
from hgad.prior import HALF_LOG_2PI, HierarchicalPrior

__all__ = [
    "sq_distances",
    "loss_g",
    "loss_mi",
    "loss_entropy",
    "intra_log_mixture",
    "loss_intra",
    "loss_z",
    "loss_gaussian",
    "LossConfig",
    "hgad_loss",
]



def sq_distances(z: Tensor, centres: Tensor) -> Tensor:
    """Squared Euclidean distances ``(N, M)`` between ``z (N, D)`` and ``centres (M, D)``, in float32.

    Uses ``|z|^2 + |c|^2 - 2 z.c`` (no ``(N, M, D)`` tensor) and clamps rounding negatives at 0.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        centres = centres.float()
        d = (z * z).sum(1, keepdim=True) + (centres * centres).sum(1)[None, :] - 2.0 * (z @ centres.T)
    return d.clamp_min(0.0)


def _main_logits(d: Tensor, log_pi: Tensor) -> Tensor:
    """Unnormalised log joint ``-d/2 + log pi`` of vector and class, ``(N, Y)``."""
    return -0.5 * d + log_pi.float()[None, :]


def _loss_g(d: Tensor, logdet: Tensor, log_pi: Tensor, dim: int) -> Tensor:
    nll = -torch.logsumexp(_main_logits(d, log_pi), dim=1) - logdet
    return (nll / dim).mean()


def _smoothed_onehot(labels: Tensor, n_classes: int, smoothing: float) -> Tensor:
    onehot = F.one_hot(labels.long(), n_classes).float()
    return (1.0 - smoothing) * onehot + smoothing / n_classes


def _loss_mi(d: Tensor, labels: Tensor, log_pi: Tensor, smoothing: float) -> Tensor:
    log_pi = log_pi.detach().float()
    log_post = F.log_softmax(_main_logits(d, log_pi), dim=1)
    target = _smoothed_onehot(labels, d.shape[1], smoothing)
    return (target * (log_post - log_pi[None, :])).sum(1).mean()


def _entropy(d: Tensor) -> Tensor:
    """Per-vector entropy of ``softmax_y(-d/2)``, ``(N,)``."""
    log_p = F.log_softmax(-0.5 * d, dim=1)
    return -(log_p.exp() * log_p).sum(1)


def _loss_intra(log_mix: Tensor, logdet: Tensor, dim: int) -> Tensor:
    return ((-log_mix - logdet) / dim).mean()


def _loss_z(log_mix: Tensor, logdet: Tensor, dim: int) -> Tensor:
    logp = (-dim * HALF_LOG_2PI + log_mix + logdet) / dim
    return (-F.logsigmoid(logp)).mean()


def loss_g(z: Tensor, logdet: Tensor, mu: Tensor, log_pi: Tensor) -> Tensor:
    """``L_g``: mean of ``[-logsumexp_y(-|z - mu_y|^2/2 + log pi_y) - logdet] / D``."""
    return _loss_g(sq_distances(z, mu), logdet.float(), log_pi, z.shape[1])


def loss_mi(z: Tensor, labels: Tensor, mu: Tensor, log_pi: Tensor, smoothing: float = 0.02) -> Tensor:
    """``L_mi``: mean of ``sum_y ytilde_y [log p(y|z) - log sg(pi_y)]``, an estimate of I(z; y) to maximise.

    ``p(y|z)`` uses the stopped-gradient ``log_pi``; ``ytilde = (1 - smoothing) onehot + smoothing / Y``.
    """
    return _loss_mi(sq_distances(z, mu), labels, log_pi, smoothing)


def loss_entropy(z: Tensor, mu: Tensor) -> Tensor:
    """``L_e``: mean entropy of ``softmax_y(-|z - mu_y|^2 / 2)`` (no class prior)."""
    return _entropy(sq_distances(z, mu)).mean()


def intra_log_mixture(z: Tensor, labels: Tensor, centres: Tensor, log_w: Tensor) -> Tensor:
    """Per-vector ``logsumexp_k(-|z_i - c_{y_i,k}|^2 / 2 + log w_{y_i,k})``, ``(N,)``.

    ``centres`` is ``(Y, K, D)`` and ``log_w`` is ``(Y, K)``; distances to all ``Y*K`` centres come from
    one matmul and the ``K`` columns of each vector's class are gathered.
    """
    n_classes, n_intra, dim = centres.shape
    d = sq_distances(z, centres.reshape(n_classes * n_intra, dim)).view(-1, n_classes, n_intra)
    labels = labels.long()
    rows = torch.arange(d.shape[0], device=d.device)
    logits = -0.5 * d[rows, labels] + log_w.float()[labels]
    return torch.logsumexp(logits, dim=1)


def loss_intra(z: Tensor, logdet: Tensor, labels: Tensor, centres: Tensor, log_w: Tensor) -> Tensor:
    """``L_in``: mean of ``[-intra_log_mixture - logdet] / D``."""
    return _loss_intra(intra_log_mixture(z, labels, centres, log_w), logdet.float(), z.shape[1])


def loss_z(z: Tensor, logdet: Tensor, labels: Tensor, centres: Tensor, log_w: Tensor) -> Tensor:
    """``L_z``: mean ``-log sigmoid(logp)``, ``logp = [-D ln(2 pi)/2 + intra_log_mixture + logdet] / D``."""
    return _loss_z(intra_log_mixture(z, labels, centres, log_w), logdet.float(), z.shape[1])


def loss_gaussian(z: Tensor, logdet: Tensor) -> Tensor:
    """Single ``N(0, I)`` prior (CFLOW-style baseline): mean of ``[D ln(2 pi)/2 + |z|^2/2 - logdet] / D``."""
    z = z.float()
    dim = z.shape[1]
    return ((dim * HALF_LOG_2PI + 0.5 * (z * z).sum(1) - logdet.float()) / dim).mean()


@dataclass(frozen=True)
class LossConfig:
    """Weights and switches of the HGAD objective (paper defaults)."""

    lambda1: float = 1.0
    lambda2: float = 100.0
    use_mi: bool = True
    use_entropy: bool = True
    use_intra: bool = True
    prior: str = "hgmm"
    label_smoothing: float = 0.02


def hgad_loss(
    z: Tensor,
    logdet: Tensor,
    labels: Tensor | None,
    prior: HierarchicalPrior | None,
    *,
    stage: int,
    cfg: LossConfig,
) -> dict[str, Tensor]:
    """Loss terms and their total for one scale.

    Stage 1: ``lambda1 L_g - lambda2 L_mi + L_e``; stage 2 adds ``L_in + L_z`` (when ``use_intra``).
    With ``cfg.prior == "gaussian"`` the total is :func:`loss_gaussian` alone (key ``"g"``).
    Keys of terms that are switched off are absent.
    """
    if stage not in (1, 2):
        raise ConfigError("stage", f"must be 1 or 2, got {stage}")
    z = z.float()
    logdet = logdet.float()
    if cfg.prior == "gaussian":
        g = loss_gaussian(z, logdet)
        return {"g": g, "total": g}
    if cfg.prior != "hgmm":
        raise ConfigError("prior", f"must be 'hgmm' or 'gaussian', got {cfg.prior!r}")
    if prior is None:
        raise ConfigError("prior", "the 'hgmm' prior needs a HierarchicalPrior")
    needs_labels = cfg.use_mi or (stage == 2 and cfg.use_intra)
    if needs_labels and labels is None:
        raise ConfigError("labels", "class labels are needed to train the hierarchical prior")
    dim = z.shape[1]
    log_pi = prior.log_pi()
    d = sq_distances(z, prior.mu)
    out: dict[str, Tensor] = {"g": _loss_g(d, logdet, log_pi, dim)}
    total = cfg.lambda1 * out["g"]
    if cfg.use_mi:
        out["mi"] = _loss_mi(d, labels, log_pi, cfg.label_smoothing)
        total = total - cfg.lambda2 * out["mi"]
    if cfg.use_entropy:
        out["e"] = _entropy(d).mean()
        total = total + out["e"]
    if stage == 2 and cfg.use_intra:
        log_mix = intra_log_mixture(z, labels, prior.intra_centres(), prior.log_w())
        out["in"] = _loss_intra(log_mix, logdet, dim)
        out["z"] = _loss_z(log_mix, logdet, dim)
        total = total + out["in"] + out["z"]
    out["total"] = total
    return out
