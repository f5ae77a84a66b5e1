"""Exploration: the default score's map under other features, blurs and image scores, without a flow.

The default pixel score (``knn``, ``knn_space input``, ``score_scales 1``) reads the flow only for the
inferred class (100 % accurate on both dev sets): it is the distance of each whitened finest-scale
feature vector to the nearest memory-bank vector of its class, standardised per class and position.
This script computes that map directly (the bank holds every training vector, a training image's own
left out, where the model keeps a 32-image sample; true class) for feature settings, blurs and image
scores the trained model would need a new training run to try, and prints image AUROC / pixel AUROC /
AUPRO per row.

    python benchmarks/screen_bank.py --data DATA_DIR --out result.json
    python benchmarks/screen_bank.py --data DATA_DIR --only default lite2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from explore_scores import _knn_distance, _metrics, _standardise, _to_map  # noqa: E402
from screen_features import _whiten, dataset_features  # noqa: E402

# Feature settings: hgad config overrides on top of the default preset (only the finest scale is built).
GRID: dict[str, dict[str, Any]] = {
    "default": {},
    "pool 1": {"feature_pool": 1},
    "pool 5": {"feature_pool": 5},
    "img 320": {"img_size": 320},
    "img 448": {"img_size": 448},
    "lite2": {"backbone": "tf_efficientnet_lite2"},
}
SIGMAS = (2.0, 4.0, 8.0)
TOP_FRACS: dict[str, float | None] = {"max": None, "top 0.1 %": 0.001, "top 1 %": 0.01}


def bank_map(data: Path, overrides: dict[str, Any]) -> tuple[Any, int, torch.Tensor, torch.Tensor]:
    """The catalog, map size, the test images' standardised finest-scale bank distances and their masks."""
    f = dataset_features(data, {**overrides, "pyramid_levels": 1})
    cat, cfg, tr, te, masks, tc, ec = (f[k] for k in ("cat", "cfg", "tr", "te", "masks", "tc", "ec"))
    w_tr, w_te = _whiten(tr[0], te[0])
    k_tr, k_te = _knn_distance(w_tr, tc, w_te, ec, len(cat.classes))
    return cat, cfg.map_size, _standardise(k_tr, tc, k_te, ec, len(cat.classes), 1.0).float(), masks


def screen(data: Path, names: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Every (setting, blur, image score) row's metrics, and each setting's seconds."""
    rows: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        cat, size, levels, masks = bank_map(data, GRID[name])
        for sigma in SIGMAS:
            maps = _to_map([levels], size, sigma)
            for score, frac in TOP_FRACS.items():
                key = f"{name}, sigma {sigma:g}, {score}"
                rows[key] = report(key, _metrics(cat, maps, masks, frac))
        seconds[name] = round(time.perf_counter() - t0, 1)
    return rows, seconds


def report(key: str, r: dict[str, Any]) -> dict[str, Any]:
    """Print one row's means and per-class image AUROCs; return the row."""
    per = " ".join(f"{100 * v['image_auroc']:.0f}" for v in r["per_class"].values())
    pixel = "" if r["pixel_auroc"] is None else f" pixel {100 * r['pixel_auroc']:.1f} aupro {100 * r['aupro']:.1f}"
    print(f"{key:32s} image {100 * r['image_auroc']:.1f}{pixel} | {per}", flush=True)
    return r


def cli(doc: str, grid: dict[str, Any], run) -> None:
    """The command line of a screen: ``run(data, names)`` gives (rows, seconds), written to ``--out``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="dataset folder (MVTec layout)")
    p.add_argument("--only", nargs="+", choices=list(grid), default=list(grid), help="rows to screen")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="results JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, seconds = run(args.data, args.only)
    if args.out:
        args.out.write_text(json.dumps({"data": str(args.data), "load_avg_at_end": os.getloadavg(), "seconds": seconds,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    cli(__doc__, GRID, screen)
