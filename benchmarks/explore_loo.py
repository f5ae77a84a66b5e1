"""Exploration: are the training images' own distances a fair yardstick for a new image's?

The ``mahalanobis`` map is standardised per class and position by the distances of the *training*
images to a Gaussian fitted to those same images. A fitted Gaussian is closer to the vectors it was fitted
on than to new ones, and the more so the fewer vectors a scale has (24² per image at the finest scale,
6² at the coarsest, for a 112-dimensional covariance): the coarse scales' statistics then understate how
far a normal *test* image lies, and its upsampled plateaus dominate the image score. The memory bank
already leaves a training image's own vectors out. This script scores one trained run's test images
with the class Gaussians' statistics taken in-sample (today's) and leave-one-image-out (each training
image's distances to the Gaussian fitted without it), alone and plus the bank map, and prints image AUROC
/ pixel AUROC / AUPRO per class. Test images are scored against the Gaussian of all training images in
both cases: only the yardstick changes.

    python benchmarks/explore_loo.py --run RUN_DIR --data DATA_DIR --out result.json
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

from explore_scores import _knn_distance, _metrics, _standardise, _to_map, load_latents  # noqa: E402
from hgad.scoring import fit_class_gaussians  # noqa: E402

_RIDGE = 0.01  # the product's ridge (hgad.model._LATENT_RIDGE)


def _distance(z: torch.Tensor, mean: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    return ((z.double() - mean.double()) @ root.double().T).pow(2).sum(-1).sqrt()


def gauss_maps(train: torch.Tensor, train_cls: torch.Tensor, test: torch.Tensor, test_cls: torch.Tensor,
               n_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distance maps (N, h, w) to the class Gaussian: training images in-sample, training images
    leave-one-image-out, test images."""
    d_in = torch.zeros(train.shape[:3], dtype=torch.float64)
    d_loo = torch.zeros_like(d_in)
    d_test = torch.zeros(test.shape[:3], dtype=torch.float64)
    for c in range(n_classes):
        idx = torch.nonzero(train_cls == c).flatten()
        if not len(idx):
            continue
        own = train[idx].double().flatten(1, 2)  # (n, hw, D)
        s1 = own.sum((0, 1))[None]
        s2 = torch.einsum("nid,nie->de", own, own)[None]
        count = torch.tensor([float(own.shape[0] * own.shape[1])])
        mean, root = fit_class_gaussians(s1, s2, count, _RIDGE)
        d_in[idx] = _distance(own, mean[0], root[0]).view(-1, *train.shape[1:3])
        sel = test_cls == c
        if bool(sel.any()):
            d_test[sel] = _distance(test[sel].flatten(1, 2), mean[0], root[0]).view(-1, *test.shape[1:3])
        for j, i in enumerate(idx.tolist()):
            v = own[j]
            if len(idx) == 1:  # nothing to leave out from
                d_loo[i] = d_in[i]
                continue
            m, r = fit_class_gaussians(s1 - v.sum(0), s2 - v.T @ v, count - v.shape[0], _RIDGE)
            d_loo[i] = _distance(v, m[0], r[0]).view(*train.shape[1:3])
    return d_in, d_loo, d_test


def explore(run: Path, data: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, cat, tr, te = load_latents(run, data)
    y, size, sigma = model.n_classes, model.cfg.map_size, model.cfg.blur_sigma
    tc, ec = tr["classes"], te["classes"]
    g_in, g_loo, knn = [], [], []
    for lvl in range(len(tr["z"])):
        d_in, d_loo, d_te = gauss_maps(tr["z"][lvl], tc, te["z"][lvl], ec, y)
        g_in.append(_standardise(d_in, tc, d_te, ec, y, 1.0))
        g_loo.append(_standardise(d_loo, tc, d_te, ec, y, 1.0))
        ratio = (d_loo.mean() / d_in.mean()).item()
        print(f"scale {lvl}: mean training distance LOO / in-sample {ratio:.3f}, test / in-sample "
              f"{(d_te[te['classes'] >= 0].mean() / d_in.mean()).item():.3f}", flush=True)
        k_tr, k_te = _knn_distance(tr["z"][lvl], tc, te["z"][lvl], ec, y)
        knn.append(_standardise(k_tr, tc, k_te, ec, y, 1.0))
    variants = {
        "gauss in-sample": g_in,
        "gauss loo": g_loo,
        "knn": knn,
        "gauss in-sample + knn": [a + b for a, b in zip(g_in, knn)],
        "gauss loo + knn": [a + b for a, b in zip(g_loo, knn)],
        "knn fine": knn[:1],
        "gauss loo fine": g_loo[:1],
        "gauss loo + knn fine": [a + b for a, b in zip(g_loo[:1], knn[:1])],
    }
    results = {}
    for name, levels in variants.items():
        r = _metrics(cat, _to_map(levels, size, sigma), te["masks"], None)
        results[name] = r
        per = " ".join(f"{100 * v['image_auroc']:.0f}" for v in r["per_class"].values())
        print(f"{name:24s} image {100 * r['image_auroc']:.1f} pixel {100 * (r['pixel_auroc'] or 0):.1f} "
              f"aupro {100 * (r['aupro'] or 0):.1f} | {per}", flush=True)
    return {"run": str(run), "data": str(data), "seconds": round(time.perf_counter() - t0, 1), "variants": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="trained hgad run folder")
    p.add_argument("--data", type=Path, required=True, help="its dataset (MVTec layout)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="results JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        result = explore(args.run, args.data)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
