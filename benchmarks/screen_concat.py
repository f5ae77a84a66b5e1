"""Exploration: the default map on PatchCore-style concatenated taps, without a flow.

The default map (``screen_bank.py``) reads one tap (stride 16) of lite0. PatchCore describes a patch by
a mid-level and a higher-level map brought to one grid and concatenated. Here the stride-4 and stride-8
taps are averaged down to the stride-16 grid and/or the stride-32 tap is upsampled bilinearly to it, the
maps are concatenated per position and the concatenation is whitened (``joint``), or each tap is
whitened on its own and scaled by ``1/sqrt(its channels)`` so that every tap weighs the same in a
distance (``equal``); ``class``: the whitening is fitted per class (each class's own metric), on the
concatenation or per tap. Then as the default: nearest training vector of the class (a training image's own
left out), standardised per class and position, blur sigma 4, image score the maximum. True class.

    python benchmarks/screen_concat.py --data DATA_DIR --out result.json
    python benchmarks/screen_concat.py --data DATA_DIR --only default "2+3 joint"
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from explore_scores import _knn_distance, _metrics, _standardise, _to_map  # noqa: E402
from screen_bank import cli, report  # noqa: E402
from screen_features import _whiten, dataset_features  # noqa: E402

# Each row: (taps concatenated on the stride-16 grid, whitening).
GRID: dict[str, tuple[tuple[int, ...], str]] = {
    "default": ((3,), "joint"),
    "2+3 joint": ((2, 3), "joint"),
    "2+3 equal": ((2, 3), "equal"),
    "3+4 joint": ((3, 4), "joint"),
    "3+4 equal": ((3, 4), "equal"),
    "2+3+4 joint": ((2, 3, 4), "joint"),
    "2+3+4 equal": ((2, 3, 4), "equal"),
    "1+2+3 joint": ((1, 2, 3), "joint"),
    "1+2+3 equal": ((1, 2, 3), "equal"),
    "1+3 equal": ((1, 3), "equal"),
    "3 class": ((3,), "class"),
    "2+3 class": ((2, 3), "class"),
    "2+3 equal class": ((2, 3), "equal class"),
}
TAPS = (1, 2, 3, 4)
SIGMA = 4.0


def _on_grid(maps: dict[int, torch.Tensor], taps: tuple[int, ...]) -> list[torch.Tensor]:
    """Each tap's (N, h, w, C) vectors on tap 3's grid (stride 16)."""
    h, w = maps[3].shape[1:3]
    out = []
    for t in taps:
        m = maps[t].permute(0, 3, 1, 2)
        if m.shape[-2:] != (h, w):
            m = F.adaptive_avg_pool2d(m, (h, w)) if m.shape[-2] > h else F.interpolate(
                m, size=(h, w), mode="bilinear", align_corners=False)
        out.append(m.permute(0, 2, 3, 1).contiguous())
    return out


def _whitened(a: list[torch.Tensor], b: list[torch.Tensor], mode: str, tc: torch.Tensor, ec: torch.Tensor,
              n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and test vectors of the taps ``a`` / ``b`` whitened as ``mode`` says, concatenated."""
    if "class" in mode:
        w_tr = torch.empty(*a[0].shape[:3], sum(x.shape[-1] for x in a))
        w_te = torch.empty(*b[0].shape[:3], w_tr.shape[-1])
        for c in range(n_classes):
            sub = _whitened([x[tc == c] for x in a], [z[ec == c] for z in b], mode.replace("class", "").strip()
                            or "joint", tc, ec, 0)
            w_tr[tc == c], w_te[ec == c] = sub
        return w_tr, w_te
    if mode == "joint":
        return _whiten(torch.cat(a, -1), torch.cat(b, -1))
    pairs = [_whiten(x, z) for x, z in zip(a, b)]
    return (torch.cat([p[0] / p[0].shape[-1] ** 0.5 for p in pairs], -1),
            torch.cat([p[1] / p[1].shape[-1] ** 0.5 for p in pairs], -1))


def screen(data: Path, names: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Every row's metrics (image score max and top 1 %), and each row's seconds."""
    f = dataset_features(data, {"feature_mode": "layers", "taps": TAPS})
    cat, cfg, masks, tc, ec = (f[k] for k in ("cat", "cfg", "masks", "tc", "ec"))
    tr = dict(zip(TAPS, f["tr"]))
    te = dict(zip(TAPS, f["te"]))
    y = len(cat.classes)
    rows: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        taps, mode = GRID[name]
        w_tr, w_te = _whitened(_on_grid(tr, taps), _on_grid(te, taps), mode, tc, ec, y)
        k_tr, k_te = _knn_distance(w_tr, tc, w_te, ec, y)
        maps = _to_map([_standardise(k_tr, tc, k_te, ec, y, 1.0).float()], cfg.map_size, SIGMA)
        for score, frac in (("max", None), ("top 1 %", 0.01)):
            rows[f"{name}, {score}"] = report(f"{name}, {score}", _metrics(cat, maps, masks, frac))
        seconds[name] = round(time.perf_counter() - t0, 1)
    return rows, seconds


if __name__ == "__main__":
    cli(__doc__, GRID, screen)
