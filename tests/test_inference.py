"""Scoring a trained run: deploy independence, protocols, class sources, reports, predict."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builders import make_mvtec
from hgad.api import Detector
from hgad.checkpoint import load_model
from hgad.cli import main
from hgad.data import discover
from hgad.errors import ConfigError
from hgad.evaluation import evaluate
from hgad.geometry import map_to_original
from hgad.report import colorize


@pytest.fixture(scope="module")
def detector(tiny_run: Path) -> Detector:
    return Detector.load(tiny_run, device="cpu")


def _images(tiny_data: Path, n: int) -> list[Image.Image]:
    files = sorted(tiny_data.glob("*/test/*/*.png"))[:n]
    return [Image.open(f).convert("RGB") for f in files]


def test_deploy_scores_one_image_alone_as_in_a_batch(detector: Detector, tiny_data: Path):
    """No statistic is shared across a batch. Equality is to float32 rounding: CPU BLAS kernels are
    chosen by matrix size, so a batch of 1 and of 5 may round the last bit differently."""
    images = _images(tiny_data, 5)
    batch = detector.predict(images)
    for image, in_batch in zip(images, batch):
        [alone] = detector.predict(image)
        # absolute, on the map's scale: logp (|logp| ~ 10-50) carries ~1e-6 rounding that exp(logp - max)
        # and s_max - S turn into ~1e-5 of the map's range
        scale = float(in_batch.anomaly_map.max())
        np.testing.assert_allclose(alone.anomaly_map, in_batch.anomaly_map, rtol=0, atol=1e-4 * scale)
        assert alone.score == pytest.approx(in_batch.score, rel=1e-4)
        assert alone.class_index == in_batch.class_index
    # same batch size, different companions: bit-identical (nothing flows between images)
    others = _images(tiny_data, 9)[5:9]
    mixed = detector.predict([images[0], *others])
    assert np.array_equal(mixed[0].anomaly_map, batch[0].anomaly_map)
    assert batch[0].anomaly_map.shape == (64, 64)
    assert all(p.score == pytest.approx(float(p.anomaly_map.max())) for p in batch)


def test_predict_accepts_tensor_and_forced_class(detector: Detector, tiny_data: Path):
    image = _images(tiny_data, 1)[0]
    tensor = detector.preprocess(image)
    [a] = detector.predict(image)
    [b] = detector.predict(tensor)
    assert np.array_equal(a.anomaly_map, b.anomaly_map)
    [forced] = detector.predict(image, class_name="alpha", threshold=0.0)
    assert forced.class_name == "alpha" and forced.is_anomalous == (forced.score > 0.0)
    with pytest.raises(ConfigError, match="unknown class 'nope'"):
        detector.predict(image, class_name="nope")


def test_deploy_max_maps_are_inverted_likelihood_products(detector: Detector, tiny_data: Path):
    """Under the release's max normalisation, as the deploy protocol applies it (clamped, from the stored
    training maxima), the product of two non-negative maps is never negative. (The default z-scored maps
    are signed: a position more normal than the training images' mean scores below 0.)"""
    from hgad.data import preprocess
    from hgad.map_stats import MapStats, Normalisation

    model = detector.model
    norm = Normalisation(MapStats(model.logp_max, model.logp_smax), MapStats(model.ent_max, model.ent_smax),
                         clamp=True)
    images = torch.stack([preprocess(im, model.cfg.img_size, model.input_norm, model.cfg.resize)
                          for im in _images(tiny_data, 6)])
    maps = model.score(model.extract(images), score="product", norm=norm).maps
    assert bool(torch.isfinite(maps).all()) and float(maps.min()) >= 0
    assert torch.all(torch.isfinite(model.threshold))


@pytest.mark.parametrize("protocol", ["deploy", "paper"])
@pytest.mark.parametrize("class_source", ["known", "inferred"])
def test_evaluate_protocols_and_class_sources(tiny_run: Path, tiny_data: Path, protocol: str, class_source: str):
    model = load_model(tiny_run)
    catalog = discover([f"mvtec:{tiny_data}"], need_train=False)
    result = evaluate(model, catalog, protocol=protocol, class_source=class_source, progress=False)
    assert set(result.per_class) == {"alpha", "bottle"}
    for metrics in result.per_class.values():
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "image_f1max"):
            assert 0.0 <= metrics[key] <= 1.0, key
    assert len(result.scores) == len(catalog.test) == 9
    if class_source == "known":
        assert result.class_accuracy == 1.0
    assert 0.0 <= result.class_accuracy <= 1.0
    assert len(result.histograms["bottle"]["anomalous"]) > 0


def test_paper_protocol_normalises_by_the_test_set(tiny_run: Path, tiny_data: Path):
    """Paper protocol: the most normal test vector of each class gets exp(0) = 1 at its scale."""
    model = load_model(tiny_run)
    catalog = discover([f"mvtec:{tiny_data}"], need_train=False)
    paper = evaluate(model, catalog, protocol="paper", class_source="known", progress=False)
    deploy = evaluate(model, catalog, protocol="deploy", class_source="known", progress=False)
    assert not np.allclose(paper.scores, deploy.scores)
    # adding images to a class's test set changes paper scores of the others, never deploy scores
    sub = catalog.subset(["bottle"])
    paper_sub = evaluate(model, sub, protocol="paper", class_source="known", progress=False)
    deploy_sub = evaluate(model, sub, protocol="deploy", class_source="known", progress=False)
    bottle = [i for i, r in enumerate(deploy.records) if r.class_name == "bottle"]
    np.testing.assert_allclose(deploy_sub.scores, deploy.scores[bottle], rtol=1e-5)
    np.testing.assert_allclose(paper_sub.scores, paper.scores[bottle], rtol=1e-5)  # same class set: same stats


def test_unseen_class_known_is_an_error_inferred_is_flagged(tiny_run: Path, tmp_path: Path):
    other = make_mvtec(tmp_path / "other", {"zebra": {"cut": 1}}, n_train=1, n_good=1)
    with pytest.raises(ConfigError, match=r"zebra.*not in the model; it knows: alpha, bottle"):
        evaluate(load_model(tiny_run), discover([f"mvtec:{other}"], need_train=False), class_source="known",
                 progress=False)
    result = evaluate(load_model(tiny_run), discover([f"mvtec:{other}"], need_train=False),
                      class_source="inferred", progress=False)
    assert result.unseen == ["zebra"]
    assert "class_accuracy" not in result.per_class["zebra"]


def test_cli_test_writes_reports(tiny_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "report"
    assert main(["test", str(tiny_run), "--out", str(out), "--no-progress", "--class-source", "known"]) == 0
    printed = capsys.readouterr().out
    assert "| **mean** |" in printed and "I-AUROC" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "deploy" and set(metrics["per_class"]) == {"alpha", "bottle"}
    assert math.isfinite(metrics["mean"]["image_auroc"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1  # the histograms
    assert html.count("data:image/jpeg;base64,") >= 2 * 2  # thumbnails: examples of both classes
    assert "Log-likelihood of normal vs defective" in html and "Decisions at the deployed thresholds" in html
    assert str(tiny_run.resolve()) in html and "worst miss first" in html  # provenance, review order
    assert set(metrics["decisions"]) == {"alpha", "bottle"} and metrics["provenance"]["protocol"] == "deploy"
    assert "thr_recall" in metrics["mean"] and "recall@thr" in printed and "FPR@thr" in printed
    rows = list(csv.DictReader((out / "image_scores.csv").open()))
    assert len(rows) == 9 and {r["scored_as"] for r in rows} <= {"alpha", "bottle"}
    assert {r["decision"] for r in rows} <= {"anomalous", "normal"}
    assert all((r["decision"] == "anomalous") == (float(r["score"]) > float(r["threshold"])) for r in rows)
    # per defect type: each type's images against the class's normal ones, as the scores in the CSV give it
    per_defect = metrics["per_defect_type"]
    assert {c: sorted(k) for c, k in per_defect.items()} == {"alpha": ["hole"], "bottle": ["broken", "crack"]}
    for cls, kinds in per_defect.items():
        for kind, m in kinds.items():
            normal = [float(r["score"]) for r in rows if r["class"] == cls and r["label"] == "0"]
            bad = [float(r["score"]) for r in rows if r["class"] == cls and r["defect_type"] == kind]
            assert m["n"] == len(bad) and m["image_auroc"] == pytest.approx(
                np.mean([(b > g) + 0.5 * (b == g) for b in bad for g in normal]))
            assert m["thr_recall"] == pytest.approx(np.mean([b > float(r["threshold"]) for b, r in zip(
                bad, [r for r in rows if r["class"] == cls and r["defect_type"] == kind])]))
    assert "| bottle | crack | 1 |" in printed and "Per defect type" in html


def test_cli_predict_reports_bad_files_and_scores_the_rest(tiny_run: Path, tiny_data: Path, tmp_path: Path,
                                                         capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, f in enumerate(sorted(tiny_data.glob("bottle/test/*/*.png"))[:3]):
        (folder / f"img{i}.png").write_bytes(f.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "preds"
    # an unscored image makes the exit code 1 (issue #14), unless --allow-errors
    assert main(["predict", str(tiny_run), str(folder), "--out", str(out), "--no-progress"]) == 1
    assert "1 of 4 images could not be scored" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), str(folder), "--out", str(out), "--no-progress", "--allow-errors"]) == 0
    assert "scored 3 of 4 images" in capsys.readouterr().out
    rows = {Path(r["path"]).name: r for r in csv.DictReader((out / "scores.csv").open())}
    assert rows["broken.png"]["error"].startswith("cannot read image")
    for i in range(3):
        row = rows[f"img{i}.png"]
        assert row["error"] == "" and float(row["score"]) >= 0
        png = np.array(Image.open(out / row["map"]))
        assert png.dtype == np.uint16 and png.shape == (32, 32)  # the image's own size, not the 64 px map
        assert Image.open(out / "overlays" / f"img{i}.png").size == (32, 32)
        mask = np.array(Image.open(out / row["mask"]))
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
        assert row["decision"] in ("normal", "anomalous", "unknown") and 0 < float(row["class_confidence"]) <= 1
    assert main(["predict", str(tiny_run), str(folder / "img0.png"), "--out", str(tmp_path / "npy"),
                 "--map-format", "npy", "--no-progress"]) == 0
    amap = np.load(tmp_path / "npy" / "maps" / "img0.npy")
    [direct] = Detector.load(tiny_run, "cpu").predict(Image.open(folder / "img0.png"))
    np.testing.assert_array_equal(amap, map_to_original(direct.anomaly_map, 32, 32, "squash"))


def test_colorize_is_jet_in_bytes_clipped_to_vmax():
    rgb = colorize(np.array([[0.0, 5.0, 10.0, 20.0, -3.0]], np.float32), 10.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 5, 3) and rgb.flags["C_CONTIGUOUS"]
    # jet: 0 -> (0, 0, 0.5), 1 -> (0.5, 0, 0), the middle light green; 255 * value, truncated
    assert rgb[0, 0].tolist() == [0, 0, 127] and rgb[0, 2].tolist() == [127, 0, 0]
    assert rgb[0, 1, 1] > 200 and rgb[0, 3].tolist() == rgb[0, 2].tolist() and rgb[0, 4].tolist() == rgb[0, 0].tolist()
    assert (colorize(np.ones((2, 2), np.float32), 0.0) == rgb[0, 0]).all()  # vmax 0: nothing to show
