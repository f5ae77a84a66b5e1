"""Hierarchical Gaussian-mixture prior of HGAD (docs/method.md): a main centre per class plus K intra-class centres.

The inter-class level (main centres ``mu`` and logits ``phi``) separates classes in latent space; the
intra-class level (offsets ``delta`` around a stopped-gradient copy of ``mu`` and logits ``psi``) models
the diversity of normal patterns inside each class. All covariances are the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hgad.errors import ConfigError

__all__ = ["HALF_LOG_2PI", "init_main_centres", "HierarchicalPrior"]

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)  # log of the N(0, 1) density's normaliser

_PAIR_DISTANCE = 5.0


def init_main_centres(n_classes: int, dim: int) -> Tensor:
    """Initial main centres ``(n_classes, dim)`` (float32), all pairs about 5 apart.

    For ``k < floor(D/Y)`` the block ``mu[:, Yk:Y(k+1)]`` is ``s * I_Y`` with ``s = 5 / sqrt(floor(2D/Y))``,
    other entries are 0. When ``D < Y`` that construction is empty; the centres are then drawn
    from ``N(0, 25 / (2D))`` with a fixed generator (seed 0), so that ``E||mu_a - mu_b||^2 = 25``.
    """
    if n_classes < 1:
        raise ConfigError("n_classes", f"must be >= 1, got {n_classes}")
    if dim < 1:
        raise ConfigError("dim", f"must be >= 1, got {dim}")
    repeats = dim // n_classes
    if repeats == 0:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(n_classes, dim, generator=gen) * (_PAIR_DISTANCE / math.sqrt(2 * dim))
    scale = _PAIR_DISTANCE / math.sqrt((2 * dim) // n_classes)
    mu = torch.zeros(n_classes, dim)
    mu[:, : repeats * n_classes] = (scale * torch.eye(n_classes)).repeat(1, repeats)
    return mu


class HierarchicalPrior(nn.Module):
    """Learnable parameters of the two-level Gaussian mixture for ``n_classes`` classes in ``dim`` dims."""

    def __init__(self, n_classes: int, dim: int, n_intra: int = 10, *, seed: int = 0) -> None:
        super().__init__()
        if n_intra < 1:
            raise ConfigError("n_intra", f"must be >= 1, got {n_intra}")
        self.n_classes = n_classes
        self.dim = dim
        self.n_intra = n_intra
        self.mu = nn.Parameter(init_main_centres(n_classes, dim))
        self.phi = nn.Parameter(torch.zeros(n_classes))
        gen = torch.Generator().manual_seed(seed)
        self.delta = nn.Parameter(torch.randn(n_classes, n_intra - 1, dim, generator=gen))
        self.psi = nn.Parameter(torch.zeros(n_classes, n_intra))

    def log_pi(self) -> Tensor:
        """Log inter-class weights ``log softmax(phi)``, ``(Y,)``."""
        return F.log_softmax(self.phi, dim=0)

    def log_w(self) -> Tensor:
        """Log intra-class weights ``log softmax(psi, -1)``, ``(Y, K)``."""
        return F.log_softmax(self.psi, dim=-1)

    def intra_centres(self) -> Tensor:
        """Intra-class centres ``(Y, K, D)``: ``sg(mu_y)`` followed by ``sg(mu_y) + delta_y``."""
        base = self.mu.detach()[:, None, :]
        return torch.cat([base, base + self.delta], dim=1)

    def main_parameters(self) -> list[nn.Parameter]:
        """Inter-class parameters ``[mu, phi]``."""
        return [self.mu, self.phi]

    def intra_parameters(self) -> list[nn.Parameter]:
        """Intra-class parameters ``[delta, psi]``."""
        return [self.delta, self.psi]
