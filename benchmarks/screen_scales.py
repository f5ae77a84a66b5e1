"""Exploration: which scales (and taps) should the anomaly map sum? Screened without training a flow.

The default model's pixel score sums standardised maps over its three pyramid scales. This script
computes, per scale of one or two feature settings (the default tap 3, and with ``--taps 2 3`` also the
stride-8 tap 2), the two maps of the default score's parts on the *whitened features* (what the flow
reads): the per-class Gaussian's Mahalanobis distance and the memory bank's nearest distance (a
training image's own vectors left out), each standardised per class and position by the training
images. It then prints image AUROC / pixel AUROC / AUPRO for combinations of scales and parts. The
class of a test image is its true class (the trained models infer it with 100 % accuracy on both dev
sets). At the default schedule the flow changes such numbers little (``explore_scores.py``: "input"
against "latent" rows), so the screen ranks the choices at a fraction of a training run's cost.

    python benchmarks/screen_scales.py --data DATA_DIR [--taps 2 3] --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from explore_scores import _gauss_distance, _knn_distance, _metrics, _standardise, _to_map  # noqa: E402
from screen_features import _whiten, dataset_features  # noqa: E402

# each row: (tap, scale index) pairs to sum, finest scale = 0
ROWS: dict[str, list[tuple[int, int]]] = {
    "tap 3 all scales": [(3, 0), (3, 1), (3, 2)],
    "tap 3 fine": [(3, 0)],
    "tap 3 fine+mid": [(3, 0), (3, 1)],
    "tap 2 all scales": [(2, 0), (2, 1), (2, 2)],
    "tap 2 fine + tap 3 all": [(2, 0), (3, 0), (3, 1), (3, 2)],
    "tap 2 fine + tap 3 fine": [(2, 0), (3, 0)],
    "tap 2 fine": [(2, 0)],
}


def part_maps(data: Path, tap: int) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The catalog, per scale of the default pyramid on ``tap`` the standardised (Gaussian, bank) maps of
    the test images, and their masks."""
    f = dataset_features(data, {"taps": (tap,)})
    cat, tr, te, masks, tc, ec = (f[k] for k in ("cat", "tr", "te", "masks", "tc", "ec"))
    y = len(cat.classes)
    out = []
    for lvl in range(len(tr)):
        w_tr, w_te = _whiten(tr[lvl], te[lvl])
        g_tr, g_te = _gauss_distance(w_tr, tc, w_te, ec, y)
        k_tr, k_te = _knn_distance(w_tr, tc, w_te, ec, y)
        out.append((_standardise(g_tr, tc, g_te, ec, y, 1.0).float(), _standardise(k_tr, tc, k_te, ec, y, 1.0).float()))
        print(f"tap {tap} scale {lvl}: {tuple(tr[lvl].shape[1:])}", flush=True)
    return cat, out, masks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="dataset folder (MVTec layout)")
    p.add_argument("--taps", type=int, nargs="+", default=[3], help="backbone taps to screen (2: stride 8; slow)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="results JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    maps: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for tap in args.taps:
        cat, maps[tap], masks = part_maps(args.data, tap)
    from hgad.config import preset

    size, sigma = preset("fast").map_size, preset("fast").blur_sigma
    results: dict[str, Any] = {}
    for name, parts in ROWS.items():
        if any(tap not in maps for tap, _ in parts):
            continue
        for kind in ("gauss + knn", "knn"):
            levels = [maps[t][s][1] + (maps[t][s][0] if kind == "gauss + knn" else 0) for t, s in parts]
            r = _metrics(cat, _to_map(levels, size, sigma), masks, None)
            results[f"{name}, {kind}"] = r
            per = " ".join(f"{100 * v['image_auroc']:.0f}" for v in r["per_class"].values())
            print(f"{name + ', ' + kind:36s} image {100 * r['image_auroc']:.1f} "
                  f"pixel {100 * (r['pixel_auroc'] or 0):.1f} aupro {100 * (r['aupro'] or 0):.1f} | {per}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"data": str(args.data), "taps": args.taps,
                                        "seconds": round(time.perf_counter() - t0, 1), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
