"""Evaluation metrics: image/pixel AUROC, average precision, F1-max and AUPRO (docs/method.md, "More metrics").

Pixel metrics run on whole test sets (MVTec AD: ~1,700 images x 256² ≈ 111 M pixels), so every
metric is derived from one descending sort of the scores, done once per call and shared by all the
metrics of :func:`pixel_metrics` / :func:`image_metrics`.

Algorithm. Each score is packed with a small integer payload (the 0/1 label, or for AUPRO the id of
the ground-truth region the pixel belongs to, 0 for normal pixels) into one uint64 key whose high
bits order the float32 score descending; a plain ``np.sort`` of these keys is several times faster
than an argsort and needs no index array. Float64 scores (image level, where exactness against
scikit-learn matters more than speed) take an argsort instead. Equal scores are one threshold: the
curves are read at the last element of each group of ties, where cumulative counts (int64) give the
true/false positives ``tp``/``fp`` above every distinct threshold. From these:

* AUROC is the trapezoid over the ROC points, summed exactly in integers (= sklearn's value);
* AP is ``sum over thresholds of Δrecall · precision`` (sklearn's step-wise definition);
* F1-max is the best ``2 tp / (tp + fp + P)``;
* AUPRO weights each region pixel ``1 / (n_regions · region_size)``, so the cumulative weight at a
  threshold is the mean per-region overlap, and integrates it over FPR up to the limit.

Degenerate inputs give ``nan`` rather than a misleading number: AUROC needs both classes, AP and
F1-max need a positive, AUPRO needs a region and a normal pixel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from hgad.errors import ConfigError

__all__ = [
    "METRIC_ORDER",
    "auroc",
    "average_precision",
    "f1_max",
    "aupro",
    "pixel_metrics",
    "image_metrics",
    "by_defect_type",
    "summarise",
]

METRIC_ORDER: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "image_f1max")

_PAYLOAD_BITS = 31
_PAYLOAD_MASK = (1 << _PAYLOAD_BITS) - 1
_CHUNK = 1 << 22  # elements per block in the passes over all pixels


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of a numpy array, torch tensor (any device) or sequence."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _scores(arr: np.ndarray, *, force_float32: bool) -> np.ndarray:
    """Flat float scores: float32 when asked or when the input is no wider, float64 otherwise."""
    narrow = arr.dtype.kind == "f" and arr.dtype.itemsize <= 4
    dtype = np.float32 if force_float32 or narrow else np.float64
    flat = np.ascontiguousarray(arr, dtype=dtype).reshape(-1)
    if flat.size and np.isnan(flat.min()):  # min propagates NaN without a temporary array
        raise ValueError("scores contain NaN")
    return flat


def _binary(arr: np.ndarray, name: str) -> np.ndarray:
    """Flat boolean array from bool or 0/1 values."""
    if arr.dtype != np.bool_:
        if not ((arr == 0) | (arr == 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1")
        arr = arr != 0
    return arr.reshape(-1)


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} differ in shape: {a.shape} vs {b.shape}")


def _sort_descending(scores: np.ndarray, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Payload in descending score order, and a mask marking the last element of each tie group.

    ``payload`` is uint8 or uint32 with values below 2**31. The order inside a tie group is arbitrary,
    which is harmless because every metric reads the curves only at group ends.
    """
    n = scores.size
    is_end = np.ones(n, dtype=bool)
    if scores.dtype != np.float32:
        order = np.argsort(scores)[::-1]
        ranked = scores[order]
        is_end[:-1] = ranked[1:] != ranked[:-1]
        return payload[order], is_end
    # Built and read in chunks so that the uint64 keys are the only array of 8 bytes per pixel.
    key = np.empty(n, dtype=np.uint64)
    for lo in range(0, n, _CHUNK):
        # IEEE bits of non-negative floats grow with the value, of negative ones shrink: flipping
        # the 31 low bits of non-negatives (keeping negatives) gives a key ascending as the score
        # descends. Adding +0.0 turns -0.0 into +0.0 so that the two zeros tie.
        bits = (scores[lo : lo + _CHUNK] + np.float32(0.0)).view(np.uint32)
        flip = bits >> 31
        flip -= np.uint32(1)
        flip >>= 1  # 0x7FFFFFFF for non-negative floats, 0 for negative ones
        flip ^= bits
        part = key[lo : lo + _CHUNK]
        part[:] = flip
        part <<= _PAYLOAD_BITS
        part |= payload[lo : lo + _CHUNK]
    key.sort()
    ranked = np.empty(n, dtype=payload.dtype)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n - 1)
        is_end[lo:hi] = (key[lo + 1 : hi + 1] ^ key[lo:hi]) > _PAYLOAD_MASK
        ranked[lo : lo + _CHUNK] = key[lo : lo + _CHUNK] & _PAYLOAD_MASK
    return ranked, is_end


def _counts(positive: np.ndarray, is_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives (int64) above each distinct threshold, thresholds descending.

    An empty input gives one threshold with no positive and no negative.
    """
    if positive.size == 0:
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    n_groups = int(np.count_nonzero(is_end))
    tp = np.empty(n_groups, dtype=np.int64)
    fp = np.empty(n_groups, dtype=np.int64)
    done = n_pos = 0
    for lo in range(0, positive.size, _CHUNK):
        # uint8 view: numpy's cumsum of bool into int64 is several times slower.
        cum = np.cumsum(positive[lo : lo + _CHUNK].view(np.uint8), dtype=np.int64)
        cum += n_pos
        n_pos = int(cum[-1])
        ends = np.flatnonzero(is_end[lo : lo + _CHUNK])
        tp_part = tp[done : done + ends.size]
        tp_part[:] = cum[ends]
        np.subtract(ends + (lo + 1), tp_part, out=fp[done : done + ends.size])
        done += ends.size
    return tp, fp


def _binary_counts(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = _to_numpy(scores), _to_numpy(labels)
    _check_same_shape(scores, labels, "scores and labels")
    flat = _scores(scores, force_float32=False)
    positive = _binary(labels, "labels")
    ranked, is_end = _sort_descending(flat, positive.view(np.uint8))
    return _counts(ranked.view(np.bool_), is_end)


def _auroc_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Twice the trapezoid area in count units: sum of Δfp · (tp + tp_prev), exact in int64.
    d_fp = np.diff(fp, prepend=0)
    twice_area = int(np.sum(d_fp * (tp + np.concatenate(([0], tp[:-1])))))
    return twice_area / (2 * n_pos * n_neg)


def _ap_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    n_pos = int(tp[-1])
    if n_pos == 0:
        return math.nan
    d_tp = np.diff(tp, prepend=0)
    hit = d_tp > 0
    precision = tp[hit] / (tp[hit] + fp[hit])
    return float(np.sum(d_tp[hit] * precision) / n_pos)


def _f1max_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    n_pos = int(tp[-1])
    if n_pos == 0:
        return math.nan
    return float(np.max(2.0 * tp / (tp + fp + n_pos)))


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (ties as in ``sklearn.metrics.roc_auc_score``); nan if one class only."""
    return _auroc_from_counts(*_binary_counts(scores, labels))


def average_precision(scores: Any, labels: Any) -> float:
    """Step-wise average precision as ``sklearn.metrics.average_precision_score``; nan if no positive."""
    return _ap_from_counts(*_binary_counts(scores, labels))


def f1_max(scores: Any, labels: Any) -> float:
    """Largest F1 over all thresholds ``score >= t`` (ties grouped); nan if no positive."""
    return _f1max_from_counts(*_binary_counts(scores, labels))


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError("fpr_limit", f"must be in (0, 1], got {fpr_limit}")


def _pixel_ranking(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Ground-truth region id (0 = normal, regions numbered from 1) of every pixel in descending
    score order, the tie-group ends, and the number of regions."""
    maps, masks = _to_numpy(maps), _to_numpy(masks)
    _check_same_shape(maps, masks, "maps and masks")
    if maps.ndim != 3:
        raise ValueError(f"maps and masks must be (N, H, W), got shape {maps.shape}")
    flat = _scores(maps, force_float32=True)
    positive = _binary(masks, "masks").reshape(masks.shape)
    # 8-connectivity within each image, none across images of the stack.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, n_regions = ndimage.label(positive, structure=structure, output=np.uint32)
    if n_regions > _PAYLOAD_MASK:
        raise ValueError(f"too many ground-truth regions ({n_regions})")
    ranked, is_end = _sort_descending(flat, regions.reshape(-1))
    return ranked, is_end, n_regions


def _aupro_from_ranking(
    region_ids: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_regions: int, fpr_limit: float
) -> float:
    """AUPRO from the region ids of the anomalous pixels in descending score order and the counts."""
    n_neg = int(fp[-1])
    if n_regions == 0 or n_neg == 0:
        return math.nan
    sizes = np.bincount(region_ids, minlength=n_regions + 1)
    weight = np.zeros(n_regions + 1)
    weight[1:] = 1.0 / (n_regions * sizes[1:])
    # PRO after the first k region pixels (in score order) is the sum of their weights.
    pro_after = np.concatenate(([0.0], np.cumsum(weight[region_ids])))
    fpr = np.concatenate(([0.0], fp / n_neg))
    pro = np.concatenate(([0.0], pro_after[tp]))
    j = int(np.searchsorted(fpr, fpr_limit, side="left"))  # first point at/after the limit; fpr[-1] == 1
    x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
    pro_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    area = np.trapezoid(np.append(pro[:j], pro_at_limit), np.append(fpr[:j], fpr_limit))
    return float(area / fpr_limit)


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve for FPR in [0, fpr_limit].

    ``maps`` (N, H, W) are compared at float32 precision; ``masks`` (N, H, W) are bool or 0/1.
    Regions are 8-connected components of each mask; FPR counts all normal pixels of all images.
    Returns nan when there is no region or no normal pixel.
    """
    _check_fpr_limit(fpr_limit)
    ranked, is_end, n_regions = _pixel_ranking(maps, masks)
    positive = ranked != 0
    tp, fp = _counts(positive, is_end)
    return _aupro_from_ranking(ranked[positive], tp, fp, n_regions, fpr_limit)


def pixel_metrics(maps: Any, masks: Any, *, fpr_limit: float = 0.3) -> dict[str, float]:
    """``pixel_auroc``, ``pixel_ap`` and ``aupro`` of anomaly maps (N, H, W) against masks, one sort.

    Maps are compared at float32 precision; see :func:`aupro` for the regions and nan cases.
    """
    _check_fpr_limit(fpr_limit)
    ranked, is_end, n_regions = _pixel_ranking(maps, masks)
    positive = ranked != 0
    tp, fp = _counts(positive, is_end)
    return {
        "pixel_auroc": _auroc_from_counts(tp, fp),
        "pixel_ap": _ap_from_counts(tp, fp),
        "aupro": _aupro_from_ranking(ranked[positive], tp, fp, n_regions, fpr_limit),
    }


def image_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """``image_auroc``, ``image_ap`` and ``image_f1max`` of image scores against 0/1 labels, one sort."""
    tp, fp = _binary_counts(scores, labels)
    return {
        "image_auroc": _auroc_from_counts(tp, fp),
        "image_ap": _ap_from_counts(tp, fp),
        "image_f1max": _f1max_from_counts(tp, fp),
    }


def by_defect_type(scores: Any, labels: Any, types: Any, thresholds: Any = None) -> dict[str, dict[str, float]]:
    """Per defect type of one class: ``n`` images, the ``image_auroc`` of that type's images against all the
    class's normal images (nan without normal images) and, with per-image ``thresholds``, ``thr_recall``,
    the fraction of them scored above their threshold. Says which kinds of defect a model misses, which one
    mean over all defects hides. Types are those of the anomalous images (label 1), sorted.
    """
    scores, labels = _to_numpy(scores).astype(np.float64), _binary(_to_numpy(labels), "labels")
    types = np.asarray(types, dtype=object)
    if not scores.shape == labels.shape == types.shape or scores.ndim != 1:
        raise ValueError(f"scores, labels and types must be 1-D of one length, got shapes {scores.shape}, "
                         f"{labels.shape}, {types.shape}")
    normal = scores[~labels]
    out: dict[str, dict[str, float]] = {}
    for kind in sorted({str(t) for t in types[labels]}):
        sel = labels & (types == kind)
        both = np.concatenate([scores[sel], normal])
        row = {"n": int(sel.sum()),
               "image_auroc": auroc(both, np.r_[np.ones(int(sel.sum())), np.zeros(len(normal))])}
        if thresholds is not None:
            row["thr_recall"] = float(np.mean(scores[sel] > _to_numpy(thresholds).astype(np.float64)[sel]))
        out[kind] = row
    return out


def summarise(per_class: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over classes of each metric, ignoring nan (and classes lacking the metric).

    Keys follow :data:`METRIC_ORDER`, then any other metric in order of first appearance; a metric
    that is nan for every class stays nan.
    """
    seen = dict.fromkeys(key for values in per_class.values() for key in values)
    keys = [k for k in METRIC_ORDER if k in seen] + [k for k in seen if k not in METRIC_ORDER]
    out: dict[str, float] = {}
    for key in keys:
        finite = [float(v[key]) for v in per_class.values() if key in v and not math.isnan(float(v[key]))]
        out[key] = math.fsum(finite) / len(finite) if finite else math.nan
    return out
