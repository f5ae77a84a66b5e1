"""Exploration: other image scores from the same anomaly maps of one trained hgad run.

The image score is the maximum of the summed, blurred map. On textures the coarse scale's upsampled
plateaus may drown a small defect that the fine scale sees, and the scales' maxima have different
null distributions (576 positions vs 36). This script keeps the pixel maps of ``explore_scores.py``
(``latent gauss``, and with ``--knn`` also ``latent knn`` and their sum) and changes only how the image
score is read from them:

* ``map max`` — today's: maximum of the summed map;
* ``sum / max of per-scale max`` — each scale's own map (upsampled, blurred), its maximum, summed or maxed;
* ``std ...`` — each scale's maximum first standardised by the class's training images' maxima;
* ``fine+mid std sum`` / ``fine std`` — only the finer scales.

Prints the mean image AUROC over classes and each class's. Statistics from training images only; the
class of a test image is the model's inferred class.

    python benchmarks/explore_image_scores.py --run RUN_DIR --data DATA_DIR [--knn]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from explore_scores import _gauss_distance, _knn_distance, _standardise, _to_map, load_latents  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--knn", action="store_true", help="also the memory-bank maps (minutes on a CPU)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from hgad.metrics import image_metrics

    model, cat, tr, te = load_latents(args.run, args.data)
    y, size, sigma = model.n_classes, model.cfg.map_size, model.cfg.blur_sigma
    tc, ec = tr["classes"], te["classes"]

    def both(distance) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per scale, the standardised maps of the training and of the test images."""
        out_tr, out_te = [], []
        for lvl in range(len(tr["z"])):
            d_tr, d_te = distance(tr["z"][lvl], tc, te["z"][lvl], ec, y)
            out_tr.append(_standardise(d_tr, tc, d_tr, tc, y, 1.0))
            out_te.append(_standardise(d_tr, tc, d_te, ec, y, 1.0))
        return out_tr, out_te

    families = {"latent gauss": both(_gauss_distance)}
    if args.knn:
        families["latent knn"] = both(_knn_distance)
        g, k = families["latent gauss"], families["latent knn"]
        families["latent gauss + knn"] = ([a + b for a, b in zip(g[0], k[0])], [a + b for a, b in zip(g[1], k[1])])
    labels = np.array([r.label for r in cat.test])
    true_cls = np.array([r.class_index for r in cat.test])

    def auroc(scores: torch.Tensor) -> str:
        per = [image_metrics(scores.numpy()[true_cls == c], labels[true_cls == c])["image_auroc"] for c in range(y)]
        return f"{100 * np.mean(per):.1f} | " + " ".join(f"{100 * v:.0f}" for v in per)

    def peak(levels: list[torch.Tensor]) -> torch.Tensor:
        return _to_map(levels, size, sigma).flatten(1).amax(1).double()

    print("classes:", " ".join(cat.classes))
    for fam, (maps_tr, maps_te) in families.items():
        m_tr = torch.stack([peak([m]) for m in maps_tr], 1)
        m_te = torch.stack([peak([m]) for m in maps_te], 1)
        std = torch.zeros_like(m_te)
        for c in range(y):
            std[ec == c] = (m_te[ec == c] - m_tr[tc == c].mean(0)) / m_tr[tc == c].std(0)
        rows = {"map max": peak(maps_te), "sum of per-scale max": m_te.sum(1),
                "max of per-scale max": m_te.amax(1), "std sum of per-scale max": std.sum(1),
                "std max of per-scale max": std.amax(1), "fine+mid std sum": std[:, :2].sum(1),
                "fine std": std[:, 0]}
        for name, scores in rows.items():
            print(f"{fam:18s} {name:26s} {auroc(scores)}", flush=True)


if __name__ == "__main__":
    main()
