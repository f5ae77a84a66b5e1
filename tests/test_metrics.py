"""Metrics against scikit-learn, brute force over thresholds, and hand-computed AUPRO curves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from hgad.errors import ConfigError
from hgad.metrics import (
    METRIC_ORDER,
    aupro,
    auroc,
    average_precision,
    by_defect_type,
    f1_max,
    image_metrics,
    pixel_metrics,
    summarise,
)


def _tied_data(seed: int, n: int, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Scores rounded to one decimal (many ties) and labels with both classes present."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    labels[:2] = (True, False)
    scores = np.round(rng.normal(size=n) + labels, 1).astype(dtype)
    return scores, labels


# --- AUROC / AP / F1-max -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [7, 200, 3000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_ap_match_sklearn_with_ties(seed: int, n: int, dtype: type) -> None:
    scores, labels = _tied_data(seed, n, dtype)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


def test_signed_zeros_negatives_and_infinities_tie_correctly() -> None:
    rng = np.random.default_rng(5)
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.25, np.inf], dtype=np.float32)
    scores = rng.choice(values, size=400)
    labels = rng.random(400) < 0.4
    # sklearn rejects infinities: give it the same ranking with the largest finite floats instead.
    big = float(np.finfo(np.float32).max)
    finite = np.clip(scores, -big, big).astype(np.float64)
    # sklearn sees -0.0 == 0.0 as one threshold, as must the float32 key.
    for as_type in (np.float32, np.float64):
        s = scores.astype(as_type)
        assert auroc(s, labels) == pytest.approx(roc_auc_score(labels, finite), abs=1e-12)
        assert average_precision(s, labels) == pytest.approx(
            average_precision_score(labels, finite), abs=1e-12
        )


def test_torch_inputs_match_numpy() -> None:
    scores, labels = _tied_data(3, 500, np.float32)
    ts, tl = torch.from_numpy(scores), torch.from_numpy(labels.astype(np.int64))
    assert auroc(ts, tl) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(ts.to(torch.bfloat16), tl) == pytest.approx(
        average_precision_score(labels, ts.to(torch.bfloat16).float().numpy()), abs=1e-12
    )


def _f1_max_brute(scores: np.ndarray, labels: np.ndarray) -> float:
    thresholds = np.append(np.unique(scores), np.inf)
    return max(f1_score(labels, scores >= t, zero_division=0.0) for t in thresholds)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_f1_max_matches_brute_force(seed: int) -> None:
    scores, labels = _tied_data(seed, 40)
    assert f1_max(scores, labels) == pytest.approx(_f1_max_brute(scores, labels), abs=1e-12)


def test_f1_max_hand_value() -> None:
    # Thresholds 0.9: tp1 fp0 -> 2/4; 0.5 (tie of a positive and a negative): tp2 fp1 -> 4/6;
    # 0.1: tp3 fp2 -> 6/8 (best); 0.0: tp3 fp3 -> 6/9.
    scores = [0.9, 0.5, 0.5, 0.1, 0.1, 0.0]
    labels = [1, 1, 0, 1, 0, 0]
    assert f1_max(scores, labels) == pytest.approx(0.75, abs=1e-15)


def test_perfect_and_inverted_scorers() -> None:
    labels = np.array([0, 0, 1, 0, 1, 1, 0], dtype=bool)
    perfect = labels.astype(float) + 0.1 * np.arange(7)
    assert auroc(perfect, labels) == 1.0
    assert average_precision(perfect, labels) == 1.0
    assert f1_max(perfect, labels) == 1.0
    assert auroc(-perfect, labels) == 0.0


def test_single_class_gives_nan() -> None:
    scores = [0.1, 0.4, 0.3]
    assert math.isnan(auroc(scores, [0, 0, 0]))
    assert math.isnan(auroc(scores, [1, 1, 1]))
    assert math.isnan(average_precision(scores, [0, 0, 0]))
    assert math.isnan(f1_max(scores, [0, 0, 0]))
    assert average_precision(scores, [1, 1, 1]) == 1.0  # defined: every threshold has precision 1
    assert all(math.isnan(v) for v in image_metrics(scores, [False] * 3).values())
    assert math.isnan(auroc([], []))


def test_image_metrics_keys_and_values() -> None:
    scores, labels = _tied_data(7, 150)
    out = image_metrics(scores, labels)
    assert list(out) == ["image_auroc", "image_ap", "image_f1max"]
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert out["image_f1max"] == pytest.approx(_f1_max_brute(scores, labels), abs=1e-12)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        aupro(np.zeros((4, 4)), np.zeros((4, 4), bool))
    with pytest.raises(ConfigError, match="fpr_limit"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool), fpr_limit=0.0)
    with pytest.raises(ConfigError, match="fpr_limit"):
        pixel_metrics(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool), fpr_limit=1.5)


# --- AUPRO ------------------------------------------------------------------------------------------


def _two_region_image() -> tuple[np.ndarray, np.ndarray]:
    """4x4 image: region A (2 px, top-left) and region B (4 px, bottom-right), 10 normal pixels."""
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[0, 0, :2] = True
    mask[0, 2:, 2:] = True
    score = np.zeros((1, 4, 4))
    score[0, 0, 0], score[0, 0, 1] = 0.9, 0.5  # A
    score[0, 2, 2], score[0, 2, 3], score[0, 3, 2], score[0, 3, 3] = 0.9, 0.7, 0.7, 0.1  # B
    score[0, 0, 2], score[0, 0, 3], score[0, 1, 0] = 0.8, 0.5, 0.3  # normal; the other 7 are 0
    return score, mask


# Curve of _two_region_image (PRO = mean over the 2 regions, FPR over the 10 normal pixels):
#   t=0.9 (0.0, 0.375)  t=0.8 (0.1, 0.375)  t=0.7 (0.1, 0.625)  t=0.5 (0.2, 0.875)
#   t=0.3 (0.3, 0.875)  t=0.1 (0.3, 1.0)    t=0.0 (1.0, 1.0), starting from (0, 0).
# At t=0.5 a region pixel and a normal pixel tie: one point, no intermediate step.
@pytest.mark.parametrize(
    ("limit", "area"),
    [
        (0.3, 0.375 * 0.1 + (0.625 + 0.875) / 2 * 0.1 + 0.875 * 0.1),
        # limit between (0.1, 0.625) and (0.2, 0.875): PRO(0.15) = 0.75
        (0.15, 0.375 * 0.1 + (0.625 + 0.75) / 2 * 0.05),
        # limit inside the flat first segment
        (0.05, 0.375 * 0.05),
        # the whole curve
        (1.0, 0.375 * 0.1 + (0.625 + 0.875) / 2 * 0.1 + 0.875 * 0.1 + 1.0 * 0.7),
    ],
)
def test_aupro_hand_computed_curve(limit: float, area: float) -> None:
    score, mask = _two_region_image()
    assert aupro(score, mask, fpr_limit=limit) == pytest.approx(area / limit, rel=1e-12)


def test_aupro_diagonal_pixels_form_one_region() -> None:
    # (0,0) touches (1,1) only diagonally: one 8-connected region of 3 px (4-connectivity would
    # give regions of 1 and 2 px and PRO 0.5 at the first threshold instead of 1/3).
    mask = np.zeros((1, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True
    score = np.zeros((1, 3, 3))
    score[0, 0, 0] = 0.9
    score[0, 1, 1] = score[0, 1, 2] = 0.2
    score[0, 2, 0] = 0.5  # one of the 6 normal pixels
    # Curve: (0, 1/3) at 0.9, (1/6, 1/3) at 0.5, (1/6, 1) at 0.2, (1, 1) at 0.
    expected = ((1 / 3) * (1 / 6) + 1.0 * (0.3 - 1 / 6)) / 0.3
    assert aupro(score, mask) == pytest.approx(expected, rel=1e-12)


def test_aupro_regions_do_not_join_across_images() -> None:
    # Image 0: region of 2 px on its bottom row; image 1: 1 px at its top-left, right "below" it in
    # the stack. Separate regions: PRO = (1 + 0) / 2 at t=0.9 and until FPR reaches 1.
    mask = np.zeros((2, 2, 2), dtype=bool)
    mask[0, 1, :] = True
    mask[1, 0, 0] = True
    score = np.full((2, 2, 2), 0.5)
    score[0, 1, :] = 0.9
    score[1, 0, 0] = 0.1
    assert aupro(score, mask) == pytest.approx(0.5, rel=1e-12)


def test_aupro_perfect_and_inverted() -> None:
    score, mask = _two_region_image()
    assert aupro(mask.astype(float), mask) == pytest.approx(1.0, abs=1e-12)
    assert aupro(1.0 - mask, mask) == pytest.approx(0.0, abs=1e-12)


def test_aupro_nan_without_regions_or_normal_pixels() -> None:
    score = np.random.default_rng(0).random((2, 5, 5))
    assert math.isnan(aupro(score, np.zeros((2, 5, 5), bool)))
    assert math.isnan(aupro(score, np.ones((2, 5, 5), bool)))
    assert all(math.isnan(v) for v in pixel_metrics(score, np.zeros((2, 5, 5), bool)).values())


def _aupro_reference(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Direct definition: loop over thresholds and regions, clip the polyline at the limit."""
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        hit = maps >= t
        pro = np.mean([hit[i][region].mean() for i, region in regions])
        points.append((hit[normal].mean(), pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_matches_reference_on_random_blobs(seed: int, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.random((3, 12, 12)), (0, 1, 1)) > 0.56
    maps = np.round(rng.random((3, 12, 12)) * 0.6 + masks * 0.4, 1)  # ties on purpose
    assert masks.any() and (~masks).any()
    expected = _aupro_reference(maps, masks, limit)
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, rel=1e-12)


def test_pixel_metrics_realistic_shape() -> None:
    """50 images of 256x256 with blob masks: one pass must agree with sklearn and with aupro()."""
    rng = np.random.default_rng(0)
    masks = np.zeros((50, 256, 256), dtype=np.uint8)
    for i in range(0, 50, 2):
        y, x = rng.integers(0, 200, size=2)
        masks[i, y : y + rng.integers(3, 50), x : x + rng.integers(3, 50)] = 1
    maps = (rng.random((50, 256, 256), dtype=np.float32) + 0.5 * masks).round(3)
    out = pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks))
    assert list(out) == ["pixel_auroc", "pixel_ap", "aupro"]
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-12)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-10)
    assert out["aupro"] == aupro(maps, masks)
    assert 0.0 < out["aupro"] < 1.0


# --- summarise ----------------------------------------------------------------------------------


def test_summarise_ignores_nan_and_orders_keys() -> None:
    per_class = {
        "a": {"image_ap": 0.5, "pixel_auroc": 0.8, "image_auroc": 1.0, "aupro": math.nan, "extra": 2.0},
        "b": {"pixel_auroc": 0.6, "image_auroc": 0.5, "aupro": math.nan, "image_ap": math.nan},
        "c": {"pixel_auroc": math.nan, "image_auroc": 0.0, "image_ap": 0.7},
    }
    out = summarise(per_class)
    assert list(out) == [k for k in METRIC_ORDER if k != "image_f1max" and k != "pixel_ap"] + ["extra"]
    assert out["image_auroc"] == pytest.approx(0.5)
    assert out["pixel_auroc"] == pytest.approx(0.7)
    assert out["image_ap"] == pytest.approx(0.6)
    assert math.isnan(out["aupro"])
    assert out["extra"] == 2.0
    assert summarise({}) == {}


# --- per defect type ----------------------------------------------------------------------------


def test_by_defect_type_hand_values() -> None:
    # normals 1, 2, 3; scratches 2.5 (beats 2 of 3 normals) and 0 (beats none): AUROC (2 + 0) / 6 = 1/3;
    # the one stain 4 beats all normals: 1. Thresholds 2.2 for every image: one scratch of two is caught.
    scores = np.array([1.0, 2.0, 3.0, 2.5, 0.0, 4.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    types = ["good", "good", "good", "scratch", "scratch", "stain"]
    out = by_defect_type(scores, labels, types, thresholds=np.full(6, 2.2))
    assert list(out) == ["scratch", "stain"]
    assert out["scratch"] == {"n": 2, "image_auroc": pytest.approx(1 / 3), "thr_recall": 0.5}
    assert out["stain"] == {"n": 1, "image_auroc": 1.0, "thr_recall": 1.0}
    # a tie with a normal counts half, as in the overall AUROC; no thresholds: no recall
    tied = by_defect_type([1.0, 2.0, 2.0], [0, 0, 1], ["good", "good", "dent"])
    assert tied == {"dent": {"n": 1, "image_auroc": 0.75}}


def test_by_defect_type_without_normals_or_defects() -> None:
    assert math.isnan(by_defect_type([1.0, 2.0], [1, 1], ["a", "b"])["a"]["image_auroc"])
    assert by_defect_type([1.0, 2.0], [0, 0], ["good", "good"]) == {}
    with pytest.raises(ValueError, match="1-D of one length"):
        by_defect_type([1.0, 2.0], [0, 1], ["good"])
