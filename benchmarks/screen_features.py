"""Exploration: which frozen features should the flow see? Screened without training a flow.

Issue 12 lists feature levers (backbone, input size, stride-8 taps, local averaging, pyramid depth).
Training one hgad model per setting costs minutes to tens of minutes on a CPU; this script instead
scores each setting's *features* the way the default model scores its latents: one Gaussian (mean,
full covariance) per class and scale fitted to the training images' vectors, the Mahalanobis distance
standardised per class and position by the training images, summed over scales (bilinear to the map
size), blurred, image score the map's maximum. At the default schedule the flow changes these numbers
by a few points only (``explore_scores.py``: "input gauss" vs "latent gauss"), so the screen ranks
feature settings at a fraction of the cost. The class of a test image is its true class (the trained
models infer it with 100 % accuracy on both dev sets).

    python benchmarks/screen_features.py --data DATA_DIR --set feature_pool=5 --set img_size=448 ...
    python benchmarks/screen_features.py --data DATA_DIR --grid default   # the committed grid
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

# Each row: a name and hgad config overrides on top of the default preset.
GRID: dict[str, dict[str, Any]] = {
    "default (lite0 384 pyramid tap 3, pool 3)": {},
    "pool 1": {"feature_pool": 1},
    "pool 5": {"feature_pool": 5},
    "img 256": {"img_size": 256},
    "img 512": {"img_size": 512},
    "pyramid 2 levels": {"pyramid_levels": 2},
    "pyramid 4 levels": {"pyramid_levels": 4},
    "pyramid tap 2 (stride 8)": {"taps": (2,)},
    "layers taps 2,3": {"feature_mode": "layers", "taps": (2, 3)},
    "layers taps 2,3,4": {"feature_mode": "layers", "taps": (2, 3, 4)},
    "lite2": {"backbone": "tf_efficientnet_lite2"},
    "lite2 img 448": {"backbone": "tf_efficientnet_lite2", "img_size": 448},
}


def _features(model, records, resize: str, batch: int = 16,
              transform=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per scale, the (N, h, w, D) feature vectors of ``records`` (each image passed through ``transform``
    first, if given); and their masks (N, S, S)."""
    from hgad.data import ImageDataset

    cfg = model.cfg
    ds = ImageDataset(records, cfg.img_size, cfg.map_size, model.input_norm, resize)
    out: list[list[torch.Tensor]] = []
    masks = []
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(len(ds), start + batch))]
        masks.extend(it.mask[0] for it in items)
        images = torch.stack([it.image for it in items])
        for lvl, f in enumerate(model.extract(images if transform is None else transform(images))):
            if lvl == len(out):
                out.append([])
            out[lvl].append(f.float().permute(0, 2, 3, 1))
    return [torch.cat(v) for v in out], torch.stack(masks)


def _whiten(train: torch.Tensor, test: torch.Tensor, eps: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets' vectors (N, h, w, D) ZCA-whitened with the training vectors' mean and covariance, as the
    model whitens its features (one transform for all classes), so that distances weigh every direction."""
    flat = train.reshape(-1, train.shape[-1]).double()
    mean = flat.mean(0)
    eigval, eigvec = torch.linalg.eigh(torch.cov(flat.T))
    w = (eigvec @ torch.diag(eigval.clamp_min(0).add(eps).rsqrt()) @ eigvec.T).float()
    return (train - mean.float()) @ w, (test - mean.float()) @ w


def dataset_features(data: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The catalog (``cat``), config (``cfg``), per-scale features of the training (``tr``) and test
    (``te``) images of the fast preset with ``overrides``, the test masks, and both sets' true classes
    (``tc``, ``ec``)."""
    from hgad.config import preset
    from hgad.data import discover
    from hgad.model import HGAD

    cat = discover([f"mvtec:{data}"])
    cfg = preset("fast", **overrides)
    model = HGAD(cfg, list(cat.classes)).eval()
    with torch.no_grad():
        tr, _ = _features(model, list(cat.train), cfg.resize)
        te, masks = _features(model, list(cat.test), cfg.resize)
    return {"cat": cat, "cfg": cfg, "tr": tr, "te": te, "masks": masks,
            "tc": torch.tensor([r.class_index for r in cat.train]),
            "ec": torch.tensor([r.class_index for r in cat.test])}


def screen(data: Path, overrides: dict[str, Any], knn: bool = False) -> dict[str, Any]:
    """Image AUROC / pixel AUROC / AUPRO of the per-class feature Gaussian for one setting (``knn``: plus
    the memory-bank map of the whitened features, the default score's second part)."""
    t0 = time.perf_counter()
    f = dataset_features(data, overrides)
    cat, cfg, tr, te, masks, tc, ec = (f[k] for k in ("cat", "cfg", "tr", "te", "masks", "tc", "ec"))
    y = len(cat.classes)
    levels = []
    for lvl in range(len(tr)):
        # features are not whitened here: scale the ridge to the features' own variance
        scale = tr[lvl].reshape(-1, tr[lvl].shape[-1]).var(0).mean().item()
        d_tr, d_te = _gauss_distance(tr[lvl] / scale ** 0.5, tc, te[lvl] / scale ** 0.5, ec, y)
        levels.append(_standardise(d_tr, tc, d_te, ec, y, 1.0))
        if knn:
            w_tr, w_te = _whiten(tr[lvl], te[lvl])
            k_tr, k_te = _knn_distance(w_tr, tc, w_te, ec, y)
            levels[-1] = levels[-1] + _standardise(k_tr, tc, k_te, ec, y, 1.0)
    maps = _to_map(levels, cfg.map_size, cfg.blur_sigma)
    result = _metrics(cat, maps, masks, None)
    result.update(seconds=round(time.perf_counter() - t0, 1), overrides={k: list(v) if isinstance(v, tuple) else v
                                                                           for k, v in overrides.items()},
                  shapes=[list(t.shape[1:]) for t in tr])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="dataset folder (MVTec layout)")
    p.add_argument("--grid", choices=["default"], help="screen every row of the built-in grid")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one setting to screen")
    p.add_argument("--knn", action="store_true", help="score Gaussian + memory bank (the default score's parts)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="results JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from accuracy import _parse_set

    rows = dict(GRID) if args.grid else {" ".join(args.set) or "default": _parse_set(args.set)}
    results: dict[str, Any] = {}
    for name, overrides in rows.items():
        r = screen(args.data, overrides, args.knn)
        results[name] = r
        print(f"{name:44s} image {100 * r['image_auroc']:.1f} pixel {100 * (r['pixel_auroc'] or 0):.1f} "
              f"aupro {100 * (r['aupro'] or 0):.1f}  shapes {r['shapes']}  {r['seconds']:.0f} s", flush=True)
        if args.out:
            args.out.write_text(json.dumps({"data": str(args.data), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
