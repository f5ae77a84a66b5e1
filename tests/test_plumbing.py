"""Plumbing on timm's tiny random-weight test model (``test_efficientnet``): shapes, train, predict, export.

These tests check that data flows through every stage (feature extraction in both modes, a short
training run with both stages, scoring from the command line, the Python API and the exported ONNX
graph agree); the weights play no part in that, so a backbone of a few thousand random parameters at
64 pixels replaces the real one. Tests that check the real weights (tests/test_backbone.py) or
accuracy keep the real backbone.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builders import make_mvtec
from hgad.api import Detector
from hgad.backbone import FeatureExtractor
from hgad.cli import main

TEST_BACKBONE = "test_efficientnet"
FLAGS = {"backbone": TEST_BACKBONE, "backbone-weights": "none", "taps": "1", "img-size": 64, "pyramid-levels": 2,
         "n-blocks": 2, "pos-dim": 16, "intra-centers": 3, "meta-epochs": 2, "sub-epochs": 1, "stage1-epochs": 1,
         "warmup-epochs": 1, "batch-size": 4, "map-size": 32, "blur-sigma": 1.0, "seed": 0}


@pytest.mark.parametrize(("mode", "taps"), [("pyramid", (1,)), ("layers", (1, 2))])
def test_feature_shapes(mode: str, taps: tuple[int, ...]):
    fx = FeatureExtractor(TEST_BACKBONE, mode=mode, taps=taps, levels=2, weights="none")
    feats = fx(torch.randn(2, 3, 64, 64))
    assert len(feats) == len(fx.feature_dims) == 2
    for f, dim, (h, w) in zip(feats, fx.feature_dims, fx.scale_shapes(64)):
        assert f.shape == (2, dim, h, w) and f.dtype == torch.float32
    assert not any(p.requires_grad for p in fx.parameters())  # frozen


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    data = make_mvtec(tmp_path_factory.mktemp("plumb") / "mvtec", {"a": {"hole": 2}, "b": {"crack": 2}},
                      n_train=8, n_good=2)
    out = tmp_path_factory.mktemp("plumb-run") / "run"
    flags = [x for k, v in FLAGS.items() for x in (f"--{k}", str(v))]
    assert main(["train", "--data", f"mvtec:{data}", "--out", str(out), "--no-progress", *flags]) == 0
    return data, out


def test_train_writes_a_calibrated_run(run):
    _, out = run
    det = Detector.load(out, "cpu")
    assert det.model.cfg.backbone == TEST_BACKBONE and bool(det.model.calibrated)
    assert np.isfinite(det.model.threshold.numpy()).all()


def test_cli_predict_agrees_with_the_api(run, tmp_path):
    data, out = run
    images = sorted((data / "a" / "test").rglob("*.png"))
    assert main(["predict", str(out), *map(str, images), "--out", str(tmp_path / "p"), "--no-progress",
                 "--map-format", "npy"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p" / "scores.csv", encoding="utf-8")))
    preds = Detector.load(out, "cpu").predict([Image.open(p) for p in images])
    assert [r["class"] for r in rows] == [p.class_name for p in preds]
    assert [float(r["score"]) for r in rows] == pytest.approx([p.score for p in preds], rel=1e-5)
    saved = np.load(tmp_path / "p" / rows[0]["map"])
    np.testing.assert_array_equal(saved, preds[0].anomaly_map)


def test_export_runs_like_the_model(run, tmp_path):
    pytest.importorskip("onnxruntime")
    from hgad.export import OnnxDetector

    data, out = run
    assert main(["export", str(out), "--out", str(tmp_path / "m.onnx")]) == 0
    images = [Image.open(p) for p in sorted((data / "b" / "test").rglob("*.png"))]
    ref = Detector.load(out, "cpu").predict(images)
    got = OnnxDetector.load(tmp_path / "m.onnx", "cpu", run_dir=out).predict(images)
    assert [g.class_index for g in got] == [r.class_index for r in ref]
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g.anomaly_map, r.anomaly_map, rtol=1e-4, atol=1e-4)
        assert g.is_anomalous == r.is_anomalous
