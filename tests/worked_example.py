"""A tiny example worked out by hand (D = 2, Y = 2 classes, K = 2 intra centres, three vectors).

Shared by the loss tests (tests/test_prior_losses.py) and the scoring tests (tests/test_scoring.py),
so that both check their formulas against the same hand-computed distances.
"""

from __future__ import annotations

__all__ = ["Z", "LOGDET", "LABELS", "MU", "PI", "D_MAIN", "DELTA", "CENTRES", "W", "D_INTRA"]

Z = [[1.0, 0.5], [-1.0, 0.0], [0.0, 1.0]]
LOGDET = [0.3, -0.2, 0.1]
LABELS = [0, 1, 1]
MU = [[1.0, 0.0], [0.0, 1.0]]
PI = [0.25, 0.75]
# squared distances |z_i - mu_y|^2, worked out by hand
D_MAIN = [[0.25, 1.25], [4.0, 2.0], [2.0, 0.0]]
# intra centres: c_{y,0} = mu_y, c_{y,1} = mu_y + delta_y
DELTA = [[[1.0, 1.0]], [[-1.0, -2.0]]]  # -> c_{0,1} = (2, 1), c_{1,1} = (-1, -1)
CENTRES = [[[1.0, 0.0], [2.0, 1.0]], [[0.0, 1.0], [-1.0, -1.0]]]  # (Y, K, D)
W = [[0.5, 0.5], [0.2, 0.8]]
# |z_i - c_{y_i,k}|^2 for the vector's own class, by hand
D_INTRA = [[0.25, 1.25], [2.0, 1.0], [0.0, 5.0]]
