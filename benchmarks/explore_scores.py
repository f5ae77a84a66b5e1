"""Exploration: other anomaly scores from the latents of one trained hgad run, without retraining.

Issue 12 asks where accuracy is lost. A trained unified model gives, per scale, latent vectors ``z`` and
their log-likelihood under the class's intra-class mixture; the deploy map standardises that
log-likelihood per class and position (``zscore``). This script scores the same test images of the
run's dataset in several other ways and prints image AUROC / pixel AUROC / AUPRO for each:

* ``logp`` — the deploy map (should reproduce ``hgad test``);
* ``logp fine`` / ``logp fine+mid`` — the same with only the finest scale(s);
* ``latent gauss`` — one Gaussian (mean, full covariance) per class and scale fitted to the training
  images' latents, Mahalanobis distance standardised per position: the per-class covariance the
  isotropic mixture lacks, on the flow's latent space;
* ``pos-mean`` — the Gaussian's mean taken per position (covariance pooled);
* ``input gauss`` — the same on the flow's input (pooled, whitened features): what the flow adds;
* ``half-pooled`` / ``class-wide`` — position statistics shrunk half-way to, or replaced by, the
  class's statistics over all positions;
* ``logp + latent gauss`` — sum of the two standardised maps;
* ``latent knn`` — distance to the nearest training latent of the class (a training image's own vectors
  left out of its search), standardised per position (``class-wide``: per class only; ``k3``: mean of
  the 3 nearest); ``input knn`` the same on the flow's input; ``latent gauss concat`` — one Gaussian of
  the three scales' latents resized to the finest grid and concatenated; ``latent gauss + knn`` — sum of
  the two standardised maps;
* ``sigma`` — the latent Gaussian map blurred with another sigma (default: the run's, 4);
* every map also with the image score as the mean of its top 1 % pixels instead of the maximum.

All statistics come from the training images only; the class of a test image is the model's inferred
class (deploy protocol).

    python benchmarks/explore_scores.py --run RUN_DIR --data DATA_DIR --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hgad.scoring import nearest_distance

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

_RIDGE = 0.01  # added to each covariance before inversion (latents have unit-scale variances)


def _encode_all(model, records, classes_known: bool, batch: int = 16) -> dict[str, Any]:
    """Per scale: flow inputs, latents, log-likelihood maps; plus classes and masks of ``records``."""
    from hgad.data import ImageDataset

    cfg = model.cfg
    ds = ImageDataset(records, cfg.img_size, cfg.map_size, model.input_norm, cfg.resize)
    out: dict[str, Any] = {"x": [], "z": [], "logp": [], "classes": [], "masks": []}
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(len(ds), start + batch))]
        images = torch.stack([it.image for it in items])
        feats = model.extract(images)
        known = torch.tensor([records[start + j].class_index for j in range(len(items))]) if classes_known else None
        lm = model.latent_maps(feats, known)
        xs, zs = [], []
        for lvl, f in enumerate(feats):
            b, d, h, w = f.shape
            x = f.float().permute(0, 2, 3, 1).reshape(-1, d)
            if cfg.whiten:
                x = F.linear(x - getattr(model, f"feat_mean{lvl}"), getattr(model, f"feat_whiten{lvl}"))
            z, _ = model.encode(f, lvl)
            xs.append(x.view(b, h, w, d))
            zs.append(z.view(b, h, w, d))
        out["x"].append(xs)
        out["z"].append(zs)
        out["logp"].append([m.cpu() for m in lm.logp])
        out["classes"].append(lm.classes.cpu())
        out["masks"].append(torch.stack([it.mask[0] for it in items]))
    return {"x": [torch.cat(v) for v in zip(*out["x"])], "z": [torch.cat(v) for v in zip(*out["z"])],
            "logp": [torch.cat(v) for v in zip(*out["logp"])], "classes": torch.cat(out["classes"]),
            "masks": torch.cat(out["masks"])}


def _gauss_distance(train: torch.Tensor, train_cls: torch.Tensor, test: torch.Tensor, test_cls: torch.Tensor,
                    n_classes: int, position_mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mahalanobis distance of each vector (N, h, w, D) to its class's Gaussian: (train maps, test maps).

    ``position_mean``: the Gaussian's mean is the class's mean at each position (the covariance is still
    pooled over positions: ~60 images cannot estimate one per position).
    """
    d_train = torch.zeros(train.shape[:3], dtype=torch.float64)
    d_test = torch.zeros(test.shape[:3], dtype=torch.float64)
    for c in range(n_classes):
        own = train[train_cls == c].double()
        if not len(own):
            continue
        mean = own.mean(0) if position_mean else own.reshape(-1, own.shape[-1]).mean(0)
        v = (own - mean).reshape(-1, own.shape[-1])
        cov = torch.cov(v.T) + _RIDGE * torch.eye(v.shape[1], dtype=v.dtype)
        prec = torch.linalg.inv(cov)
        for dist, data, cls in ((d_train, train, train_cls), (d_test, test, test_cls)):
            sel = cls == c
            if bool(sel.any()):
                u = data[sel].double() - mean
                dist[sel] = ((u @ prec) * u).sum(-1).clamp_min(0).sqrt()
    return d_train, d_test


def _knn_distance(train: torch.Tensor, train_cls: torch.Tensor, test: torch.Tensor, test_cls: torch.Tensor,
                  n_classes: int, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean distance of each vector (N, h, w, D) to its ``k`` nearest training vectors of its class.

    A training image's own vectors are left out of its search (else every training distance is 0 and
    the per-position statistics would be meaningless): the non-parametric counterpart of the Gaussian.
    """
    d_train = torch.zeros(train.shape[:3])
    d_test = torch.zeros(test.shape[:3])
    for c in range(n_classes):
        own = train[train_cls == c].float()
        if not len(own):
            continue
        n, h, w, d = own.shape
        bank = own.reshape(-1, d)
        owner = torch.arange(n).repeat_interleave(h * w)
        idx = torch.nonzero(train_cls == c).flatten()
        if k == 1:  # the product's search (a matrix product per chunk: several times faster than cdist + topk)
            for j in range(n):
                d_train[idx[j]] = nearest_distance(own[j].reshape(1, -1, d), bank[None], (owner == j)[None]).view(h, w)
            for i in torch.nonzero(test_cls == c).flatten().tolist():
                d_test[i] = nearest_distance(test[i].float().reshape(1, -1, d), bank[None]).view(h, w)
            continue
        for j in range(n):
            dist = torch.cdist(own[j].reshape(-1, d), bank)
            dist[:, owner == j] = float("inf")
            d_train[idx[j]] = dist.topk(k, dim=1, largest=False).values.mean(1).view(h, w)
        for i in torch.nonzero(test_cls == c).flatten().tolist():
            dist = torch.cdist(test[i].float().reshape(-1, d), bank)
            d_test[i] = dist.topk(k, dim=1, largest=False).values.mean(1).view(h, w)
    return d_train, d_test


def _concat_scales(levels: list[torch.Tensor]) -> torch.Tensor:
    """Vectors (N, h, w, D) of every scale resized to the finest grid and concatenated along D."""
    h, w = levels[0].shape[1:3]
    ups = [F.interpolate(v.permute(0, 3, 1, 2).float(), size=(h, w), mode="bilinear", align_corners=True)
           for v in levels]
    return torch.cat(ups, 1).permute(0, 2, 3, 1)


def _standardise(train_maps: torch.Tensor, train_cls: torch.Tensor, test_maps: torch.Tensor,
                 test_cls: torch.Tensor, n_classes: int, sign: float, pool: float = 0.0) -> torch.Tensor:
    """``sign * (test - mean) / std`` per class and position, from the training maps.

    ``pool`` in [0, 1] shrinks each position's mean and variance towards the class's values over all
    positions (0: per position, as the deploy map; 1: one mean and std per class): with ~60 training
    images a position's statistics are noisy, and on textures every position looks alike.
    """
    out = torch.zeros_like(test_maps, dtype=torch.float64)
    for c in range(n_classes):
        own = train_maps[train_cls == c].double()
        sel = test_cls == c
        if len(own) and bool(sel.any()):
            mean = (1 - pool) * own.mean(0) + pool * own.mean()
            var = (1 - pool) * own.var(0, correction=0) + pool * own.var(correction=0)
            out[sel] = sign * (test_maps[sel].double() - mean) / var.sqrt().clamp_min(1e-3)
    return out


def _to_map(levels: list[torch.Tensor], size: int, sigma: float) -> torch.Tensor:
    from hgad.scoring import gaussian_blur

    total = None
    for m in levels:
        up = F.interpolate(m[:, None].float(), size=(size, size), mode="bilinear", align_corners=True)[:, 0]
        total = up if total is None else total + up
    return gaussian_blur(total, sigma) if sigma > 0 else total


def _metrics(cat, maps: torch.Tensor, masks: torch.Tensor, top_frac: float | None) -> dict[str, Any]:
    import numpy as np

    from hgad.metrics import image_metrics, pixel_metrics, summarise

    flat = maps.flatten(1)
    if top_frac is None:
        scores = flat.amax(1)
    else:
        k = max(1, int(round(top_frac * flat.shape[1])))
        scores = flat.topk(k, dim=1).values.mean(1)
    scores = scores.numpy()
    labels = np.array([r.label for r in cat.test])
    cls = np.array([r.class_index for r in cat.test])
    per_class = {}
    for c, name in enumerate(cat.classes):
        sel = cls == c
        m = {"image_auroc": image_metrics(scores[sel], labels[sel])["image_auroc"]}
        if cat.has_masks.get(name) and top_frac is None:
            pm = pixel_metrics(maps[sel].numpy(), masks[sel].numpy() > 0.5)
            m.update({k: pm[k] for k in ("pixel_auroc", "aupro")})
        per_class[name] = m
    mean = summarise(per_class)
    return {"image_auroc": mean.get("image_auroc"), "pixel_auroc": mean.get("pixel_auroc"),
            "aupro": mean.get("aupro"), "per_class": per_class}


def load_latents(run: Path, data: Path) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """The run's model, the dataset's catalog, and :func:`_encode_all` of its training images (known
    class) and of its test images (inferred class)."""
    import hgad
    from hgad.data import discover

    model = hgad.load(str(run), device="cpu").model
    cat = discover([f"mvtec:{data}"])
    with torch.no_grad():
        tr = _encode_all(model, list(cat.train), classes_known=True)
        te = _encode_all(model, list(cat.test), classes_known=False)
    return model, cat, tr, te


def explore(run: Path, data: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, cat, tr, te = load_latents(run, data)
    y, size, sigma = model.n_classes, model.cfg.map_size, model.cfg.blur_sigma
    tc, ec = tr["classes"], te["classes"]
    n_scales = len(tr["logp"])
    logp_z = [_standardise(tr["logp"][lvl], tc, te["logp"][lvl], ec, y, -1.0) for lvl in range(n_scales)]
    logp_half = [_standardise(tr["logp"][lvl], tc, te["logp"][lvl], ec, y, -1.0, 0.5) for lvl in range(n_scales)]
    logp_cls = [_standardise(tr["logp"][lvl], tc, te["logp"][lvl], ec, y, -1.0, 1.0) for lvl in range(n_scales)]
    lat, lat_half, inp, lat_pos, inp_pos = [], [], [], [], []
    for lvl in range(n_scales):
        d_tr, d_te = _gauss_distance(tr["z"][lvl], tc, te["z"][lvl], ec, y)
        lat.append(_standardise(d_tr, tc, d_te, ec, y, 1.0))
        lat_half.append(_standardise(d_tr, tc, d_te, ec, y, 1.0, 0.5))
        d_tr, d_te = _gauss_distance(tr["z"][lvl], tc, te["z"][lvl], ec, y, position_mean=True)
        lat_pos.append(_standardise(d_tr, tc, d_te, ec, y, 1.0))
        d_tr, d_te = _gauss_distance(tr["x"][lvl], tc, te["x"][lvl], ec, y, position_mean=True)
        inp_pos.append(_standardise(d_tr, tc, d_te, ec, y, 1.0))
        d_tr, d_te = _gauss_distance(tr["x"][lvl], tc, te["x"][lvl], ec, y)
        inp.append(_standardise(d_tr, tc, d_te, ec, y, 1.0))
    knn, knn_cls, knn3, inp_knn = [], [], [], []
    for lvl in range(n_scales):
        t = time.perf_counter()
        d_tr, d_te = _knn_distance(tr["z"][lvl], tc, te["z"][lvl], ec, y)
        knn.append(_standardise(d_tr, tc, d_te, ec, y, 1.0))
        knn_cls.append(_standardise(d_tr, tc, d_te, ec, y, 1.0, 1.0))
        d_tr, d_te = _knn_distance(tr["z"][lvl], tc, te["z"][lvl], ec, y, k=3)
        knn3.append(_standardise(d_tr, tc, d_te, ec, y, 1.0))
        d_tr, d_te = _knn_distance(tr["x"][lvl], tc, te["x"][lvl], ec, y)
        inp_knn.append(_standardise(d_tr, tc, d_te, ec, y, 1.0))
        print(f"knn scale {lvl}: {time.perf_counter() - t:.0f} s", flush=True)
    d_tr, d_te = _gauss_distance(_concat_scales(tr["z"]), tc, _concat_scales(te["z"]), ec, y)
    lat_cat = [_standardise(d_tr, tc, d_te, ec, y, 1.0)]
    variants = {
        "latent knn": knn,
        "latent knn class-wide": knn_cls,
        "latent knn k3": knn3,
        "input knn": inp_knn,
        "latent gauss concat": lat_cat,
        "logp": logp_z,
        "logp fine": logp_z[:1],
        "logp fine+mid": logp_z[:2],
        "logp half-pooled": logp_half,
        "logp class-wide": logp_cls,
        "latent gauss": lat,
        "latent gauss half-pooled": lat_half,
        "input gauss": inp,
        "latent gauss pos-mean": lat_pos,
        "input gauss pos-mean": inp_pos,
        "logp + latent gauss": [a + b for a, b in zip(logp_z, lat)],
    }
    results: dict[str, Any] = {}
    variants_sigma = {name: sigma for name in variants}
    for s_ in (2.0, 8.0):
        variants[f"latent gauss sigma {s_:g}"] = lat
        variants_sigma[f"latent gauss sigma {s_:g}"] = s_
    variants["latent gauss fine+mid"] = lat[:2]
    variants_sigma["latent gauss fine+mid"] = sigma
    variants["latent gauss + knn"] = [a + b for a, b in zip(lat, knn)]
    variants_sigma["latent gauss + knn"] = sigma
    for name, levels in variants.items():
        maps = _to_map(levels, size, variants_sigma[name])
        results[name] = _metrics(cat, maps, te["masks"], None)
        results[name + " / top1%"] = _metrics(cat, maps, te["masks"], 0.01)
        r, top = results[name], results[name + " / top1%"]
        print(f"{name:24s} image {100 * r['image_auroc']:.1f} pixel {100 * (r['pixel_auroc'] or 0):.1f} "
              f"aupro {100 * (r['aupro'] or 0):.1f} | top1% image {100 * top['image_auroc']:.1f}", flush=True)
    return {"run": str(run), "data": str(data), "seconds": round(time.perf_counter() - t0, 1),
            "class_accuracy": float((ec == torch.tensor([r.class_index for r in cat.test])).double().mean()),
            "variants": results}


def table(paths: list[Path]) -> str:
    """Markdown table: one row per score, per result file image AUROC (map maximum, then mean of the top
    1 % pixels), pixel AUROC and AUPRO, in %."""
    results = {path.stem: json.loads(path.read_text())["variants"] for path in paths}
    names = [n for n in next(iter(results.values())) if not n.endswith(" / top1%")]

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    lines = ["| score | " + " | ".join(f"{n}: image (max / top 1 %) / pixel AUROC / AUPRO" for n in results) + " |",
             "|---|" + "---|" * len(results)]
    for name in names:
        cells = [f"{pct(r[name]['image_auroc'])} / {pct(r[name + ' / top1%']['image_auroc'])} / "
                 f"{pct(r[name]['pixel_auroc'])} / {pct(r[name]['aupro'])}" for r in results.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, nargs="+", metavar="JSON", help="print the table of result files and exit")
    p.add_argument("--run", type=Path, help="trained hgad run folder")
    p.add_argument("--data", type=Path, help="its dataset (MVTec layout)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="results JSON")
    args = p.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.run is None or args.data is None:
        p.error("--run and --data are needed (or --table)")
    torch.set_num_threads(args.threads)
    result = explore(args.run, args.data)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
