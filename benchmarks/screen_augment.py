"""Exploration: the default map with flipped and rotated copies of the images, without a flow.

The default map (``screen_bank.py``: the distance of each whitened finest-scale vector to the nearest
training vector of its class, standardised per class and position) misses where a normal test image
shows content no training image shows (``terrain``, ``cells``, ``grass``: crops of a photo's unseen
part). Two ways to widen what the bank has seen, both independent of the data:

* **bank augmentation** -- the bank also holds the vectors of the training images flipped or rotated;
* **test-time augmentation** (TTA) -- an image's map is the mean of the maps of its flipped copies, each
  turned back; the training images' maps that standardise it are made the same way.

A training image's own vectors, of every copy, are left out of its search. True class; image score the
map's maximum (and the mean of its top 1 %); blur sigma 4 (the default). Prints image AUROC / pixel
AUROC / AUPRO per row.

    python benchmarks/screen_augment.py --data DATA_DIR --out result.json
    python benchmarks/screen_augment.py --data DATA_DIR --only default "bank hflip"
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from explore_scores import _metrics, _standardise, _to_map  # noqa: E402
from hgad.scoring import nearest_distance  # noqa: E402
from screen_bank import cli, report  # noqa: E402
from screen_features import _features, _whiten  # noqa: E402


def _shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """The batch moved ``dx`` pixels right and ``dy`` down, the uncovered border mirrored in."""
    padded = torch.nn.functional.pad(x, (dx, 0, dy, 0), mode="reflect")
    return padded[..., : x.shape[-2], : x.shape[-1]]


# Each copy: (turn an image batch (B, C, H, W), turn a map batch (N, h, w) back). Square inputs only.
COPIES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "id": (lambda x: x, lambda m: m),
    "hflip": (lambda x: x.flip(-1), lambda m: m.flip(-1)),
    "vflip": (lambda x: x.flip(-2), lambda m: m.flip(-2)),
    "rot180": (lambda x: x.rot90(2, (-2, -1)), lambda m: m.rot90(2, (-2, -1))),
    "rot90": (lambda x: x.rot90(1, (-2, -1)), lambda m: m.rot90(-1, (-2, -1))),
    "rot270": (lambda x: x.rot90(3, (-2, -1)), lambda m: m.rot90(1, (-2, -1))),
    # half the finest grid's stride (16 px at 384 px): the vectors between the original grid's points
    "shift x": (lambda x: _shift(x, 8, 0), lambda m: m),
    "shift y": (lambda x: _shift(x, 0, 8), lambda m: m),
    "shift xy": (lambda x: _shift(x, 8, 8), lambda m: m),
}
# Each row: (copies in the bank, copies averaged at test time).
GRID: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": (("id",), ("id",)),
    "bank hflip": (("id", "hflip"), ("id",)),
    "bank flips": (("id", "hflip", "vflip", "rot180"), ("id",)),
    "bank flips+rot90": (("id", "hflip", "vflip", "rot180", "rot90", "rot270"), ("id",)),
    "bank shift xy": (("id", "shift xy"), ("id",)),
    "bank shifts": (("id", "shift x", "shift y", "shift xy"), ("id",)),
    "tta hflip": (("id",), ("id", "hflip")),
    "bank hflip, tta hflip": (("id", "hflip"), ("id", "hflip")),
}
SIGMA = 4.0


def _maps(bank_feats: dict[str, torch.Tensor], query: dict[str, torch.Tensor], cls: torch.Tensor,
          train_cls: torch.Tensor, bank_copies: tuple[str, ...], tta: tuple[str, ...], n_classes: int,
          leave_out: bool) -> torch.Tensor:
    """(N, h, w) distance maps of the ``query`` images (one whitened tensor per copy), each the mean over
    the ``tta`` copies (turned back) of the nearest distance to the class's bank of ``bank_copies``;
    ``leave_out``: the queries are the training images, each kept out of its own search."""
    n_q, h, w, d = query["id"].shape
    out = torch.zeros(n_q, h, w)
    for c in range(n_classes):
        own = torch.nonzero(train_cls == c).flatten()
        bank = torch.cat([bank_feats[k][own].reshape(-1, d) for k in bank_copies])[None]
        owner = torch.arange(len(own)).repeat_interleave(h * w).repeat(len(bank_copies))
        for i in torch.nonzero(cls == c).flatten().tolist():
            banned = (owner == int((own == i).nonzero()[0, 0]))[None] if leave_out else None
            total = torch.zeros(h, w)
            for k in tta:
                dist = nearest_distance(query[k][i].reshape(1, -1, d), bank, banned).view(1, h, w)
                total += COPIES[k][1](dist)[0]
            out[i] = total / len(tta)
    return out


def screen(data: Path, names: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Every row's metrics (image score max and top 1 %), and each row's seconds."""
    from hgad.config import preset
    from hgad.data import discover
    from hgad.model import HGAD

    cat = discover([f"mvtec:{data}"])
    cfg = preset("fast", pyramid_levels=1)
    model = HGAD(cfg, list(cat.classes)).eval()
    tc = torch.tensor([r.class_index for r in cat.train])
    ec = torch.tensor([r.class_index for r in cat.test])
    needed = sorted({k for n in names for k in GRID[n][0] + GRID[n][1]}, key=list(COPIES).index)
    tr: dict[str, torch.Tensor] = {}
    te: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for k in needed:
            tr[k] = _features(model, list(cat.train), cfg.resize, transform=COPIES[k][0])[0][0]
            te[k], masks = _features(model, list(cat.test), cfg.resize, transform=COPIES[k][0])
            te[k] = te[k][0]
    # one whitening for every copy: that of the training images' own (unturned) vectors, as the model does
    base = tr["id"]
    for k in needed:
        tr[k], te[k] = _whiten(base, tr[k])[1], _whiten(base, te[k])[1]
    rows: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    y = len(cat.classes)
    for name in names:
        t0 = time.perf_counter()
        bank_copies, tta = GRID[name]
        d_tr = _maps(tr, tr, tc, tc, bank_copies, tta, y, leave_out=True)
        d_te = _maps(tr, te, ec, tc, bank_copies, tta, y, leave_out=False)
        maps = _to_map([_standardise(d_tr, tc, d_te, ec, y, 1.0).float()], cfg.map_size, SIGMA)
        # "- median": each map less its own median, so that a normal image whose whole map is raised (content
        # no training image shows) scores by its local peaks only
        centred = maps - maps.flatten(1).median(1).values[:, None, None]
        for score, m, frac in (("max", maps, None), ("top 1 %", maps, 0.01), ("- median, max", centred, None)):
            rows[f"{name}, {score}"] = report(f"{name}, {score}", _metrics(cat, m, masks, frac))
        seconds[name] = round(time.perf_counter() - t0, 1)
    return rows, seconds


if __name__ == "__main__":
    cli(__doc__, GRID, screen)
