"""Issue 15: calibrated thresholds, whole images in original coordinates, unknown inputs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_flags
from hgad.api import Detector
from hgad.calibration import CALIBRATION_FILE, load_calibration, split_calibration
from hgad.checkpoint import load_model
from hgad.cli import main
from hgad.data import discover, preprocess
from hgad.geometry import aspect_outlier, map_to_original, to_square
from hgad.thresholds import decision_counts, decision_metrics, lower_limit, threshold_for_fpr

# ---- pure maths, against values computed by hand ------------------------------------------------------

def test_threshold_for_fpr_by_hand():
    scores = [5, 1, 9, 3, 7, 2, 10, 4, 8, 6]
    assert threshold_for_fpr(scores, 0.2) == 8  # 9 and 10 above: 2 / 10
    assert threshold_for_fpr(scores, 0.25) == 8  # 2.5 images allowed: still 2
    assert threshold_for_fpr(scores, 0.05) == 10  # below 1 / n: the highest normal score, nothing above
    assert threshold_for_fpr(scores, 0.5) == 5
    assert threshold_for_fpr([3, 3, 3, 1], 0.5) == 3  # ties: none above 3, within the target
    with pytest.raises(ValueError):
        threshold_for_fpr([1.0, float("nan")], 0.1)
    with pytest.raises(ValueError):
        threshold_for_fpr([], 0.1)


def test_decision_metrics_by_hand():
    scores = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1]
    labels = [1, 1, 1, 0, 0, 0]
    c = decision_counts(scores, labels, 0.5)  # flagged: 0.9, 0.8 (defects), 0.6 (normal)
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 1, 2, 1)
    m = decision_metrics(scores, labels, 0.5)
    assert m["thr_recall"] == pytest.approx(2 / 3) and m["thr_fpr"] == pytest.approx(1 / 3)
    assert m["thr_precision"] == pytest.approx(2 / 3) and m["thr_f1"] == pytest.approx(4 / 6)
    per_image = decision_metrics(scores, labels, [1, 1, 0.1, 1, 1, 1])  # one threshold per image
    assert per_image["thr_recall"] == pytest.approx(1 / 3) and per_image["thr_fpr"] == 0
    nothing = decision_metrics(scores, labels, 5.0)
    assert math.isnan(nothing["thr_precision"]) and nothing["thr_f1"] == 0 and nothing["thr_recall"] == 0
    assert math.isnan(decision_metrics([1, 2], [0, 0], 1.5)["thr_recall"])


def test_lower_limit_by_hand():
    assert lower_limit([10, 12, 14, 20], 1.0) == 10 - (13 - 10)
    assert lower_limit([0.98, 0.99, 1.0], 2.0) == pytest.approx(0.98 - 2 * 0.01)


# ---- geometry -----------------------------------------------------------------------------------------

def test_to_square_modes_keep_or_drop_the_borders():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :20] = 255  # left quarter white
    im = Image.fromarray(arr)
    squash = np.asarray(to_square(im, 20, "squash", Image.Resampling.NEAREST))
    crop = np.asarray(to_square(im, 20, "crop", Image.Resampling.NEAREST))
    pad = np.asarray(to_square(im, 20, "pad", Image.Resampling.NEAREST, fill=(7, 7, 7)))
    assert squash[:, :5].min() == 255 and squash[:, 5:].max() == 0
    assert crop.max() == 0  # the centre crop never sees the left quarter
    assert (pad[:5] == 7).all() and (pad[15:] == 7).all() and pad[5:15, :5].min() == 255


@pytest.mark.parametrize("mode", ["squash", "pad", "crop"])
def test_map_to_original_puts_a_square_spot_back_where_it_was(mode: str):
    """A 200x100 image with a spot at x in [10, 30): the map's spot lands there in the file's pixels."""
    w, h, m = 200, 100, 64
    img = np.zeros((h, w), np.float32)
    img[40:60, 10:30] = 1
    square = np.asarray(to_square(Image.fromarray(img, mode="F"), m, mode, Image.Resampling.BILINEAR),
                        dtype=np.float32)
    back = map_to_original(square, w, h, mode)
    assert back.shape == (h, w)
    if mode == "crop":
        assert back[:, :50].max() == 0  # outside the crop: not scored
    else:
        ys, xs = np.nonzero(back > 0.5)
        assert 8 <= xs.min() <= 12 and 27 <= xs.max() <= 31 and 38 <= ys.min() <= 42 and 57 <= ys.max() <= 61


def test_aspect_outlier():
    assert not aspect_outlier(100, 100, (1.0, 1.0)) and not aspect_outlier(120, 100, (1.0, 1.0))
    assert aspect_outlier(200, 100, (1.0, 1.0)) and aspect_outlier(100, 200, (1.0, 1.0))


def test_split_calibration_is_per_class_repeatable_and_never_empties_a_class(tiny_data: Path):
    records = discover([f"mvtec:{tiny_data}"], need_test=False).train
    train, held = split_calibration(records, 0.25, seed=3)
    assert len(held) == 4 and {r.class_name for r in held} == {"alpha", "bottle"}
    assert not {r.path for r in train} & {r.path for r in held} and len(train) + len(held) == len(records)
    assert split_calibration(records, 0.25, seed=3)[1] == held
    assert split_calibration(records, 0.0, seed=3) == (records, [])
    assert len(split_calibration(records[:2], 0.5, seed=0)[0]) >= 1


# ---- a trained tiny run -------------------------------------------------------------------------------

def test_run_stores_calibrated_thresholds_and_they_can_be_changed(tiny_run: Path, tmp_path: Path, capsys):
    cal = load_calibration(tiny_run)
    model = load_model(tiny_run)
    for c, name in enumerate(model.class_names):
        own = cal.classes[name]
        assert len(own.scores) == 2 and own.threshold_source.startswith("calibration")  # 8 images x 0.2
        assert float(model.threshold[c]) == pytest.approx(threshold_for_fpr(own.scores, cal.target_fpr))
    run = tmp_path / "run"
    run.mkdir()
    for f in tiny_run.iterdir():
        if f.is_file():
            (run / f.name).write_bytes(f.read_bytes())
    assert main(["threshold", str(run), "--class", "alpha", "--value", "12.5"]) == 0
    assert "alpha: threshold" in capsys.readouterr().out
    assert float(load_model(run).threshold[model.class_names.index("alpha")]) == 12.5
    assert load_calibration(run).classes["alpha"].threshold_source == "set by hand"
    assert main(["threshold", str(run), "--target-fpr", "0.6"]) == 0
    for c, name in enumerate(model.class_names):
        assert float(load_model(run).threshold[c]) == pytest.approx(min(cal.classes[name].scores))
    assert main(["threshold", str(run), "--class", "nope", "--value", "1"]) == 2
    assert main(["threshold", str(run), "--value", "1"]) == 2  # --class required with a value
    assert main(["threshold", str(run), "--class", "alpha", "--value", "nan"]) == 2
    (run / CALIBRATION_FILE).unlink()
    assert main(["threshold", str(run), "--target-fpr", "0.1"]) == 2
    assert "no calibration scores stored" in capsys.readouterr().err


def test_runs_before_calibration_load_as_before(tiny_run: Path, tiny_data: Path, tmp_path: Path):
    """A config.json without the new keys: crop preprocessing, training-quantile thresholds, no unknown flags."""
    run = tmp_path / "old"
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        (run / name).write_bytes((tiny_run / name).read_bytes())
    saved = json.loads((run / "config.json").read_text())
    for key in ("resize", "calibration_split", "target_fpr"):
        del saved["config"][key]
    (run / "config.json").write_text(json.dumps(saved))
    det = Detector.load(run, "cpu")
    assert det.resize == "crop" and det.calibration is None and det.model.cfg.calibration_split == 0
    image = Image.open(sorted(tiny_data.glob("bottle/test/good/*.png"))[0])
    [pred] = det.predict(image)
    assert not pred.is_unknown and pred.decision in ("normal", "anomalous")
    assert torch.equal(det.preprocess(image), preprocess(image, 128, det.model.input_norm, "crop"))


# ---- whole images and unknown inputs: a tiny model of two real textures, non-square -------------------

_W, _H = 96, 48


def _texture_crops(photo: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, photo.shape[0] - 2 * _H), rng.integers(0, photo.shape[1] - 2 * _W)
        crop = photo[y:y + 2 * _H, x:x + 2 * _W]
        out.append(np.asarray(Image.fromarray(crop).resize((_W, _H), Image.Resampling.BILINEAR)))
    return out


@pytest.fixture(scope="module")
def texture_run(tmp_path_factory) -> tuple[Path, Path]:
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("textures")
    data = root / "data"
    for c, (name, photo) in enumerate((("brick", skdata.brick()), ("grass", skdata.grass()))):
        crops = _texture_crops(photo, 16, seed=c)
        for i, arr in enumerate(crops[:12]):
            (data / name / "train" / "good").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(data / name / "train" / "good" / f"{i:03d}.png")
        for i, arr in enumerate(crops[12:]):
            (data / name / "test" / "good").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(data / name / "test" / "good" / f"{i:03d}.png")
    out = root / "run"
    flags = tiny_flags(meta_epochs=3, batch_size=4, calibration_split=0.25, target_fpr=0.2)  # default --resize squash
    assert main(["train", "--data", f"mvtec:{data}", "--out", str(out), "--no-progress", *flags]) == 0
    return out, data


def test_edge_defect_of_a_non_square_image_is_found_in_original_coordinates(texture_run, tmp_path: Path):
    run, data = texture_run
    normal = sorted((data / "brick" / "test" / "good").glob("*.png"))
    defect = np.array(Image.open(normal[0]))
    defect[12:36, 2:20] = 255  # a bright block in the left quarter, which a centre crop never sees
    assert Detector.load(run, "cpu").resize == "squash"
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(defect).save(folder / "defect.png")
    for f in normal:
        (folder / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "preds"
    assert main(["predict", str(run), str(folder), "--out", str(out), "--no-progress", "--map-format", "npy"]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader((out / "scores.csv").open())}
    d = rows["defect.png"]
    assert d["decision"] == "anomalous"
    assert float(d["score"]) > max(float(rows[f.name]["score"]) for f in normal)
    amap = np.load(out / d["map"])
    assert amap.shape == (_H, _W)  # the file's own size
    y, x = np.unravel_index(np.argmax(amap), amap.shape)
    assert x < _W // 4  # the peak is on the defect, in the file's coordinates
    mask = np.array(Image.open(out / d["mask"]))
    assert mask.shape == (_H, _W) and mask[12:36, 2:20].max() == 255


def test_blank_and_noise_frames_are_unknown_normal_images_are_not(texture_run, tmp_path: Path, capsys):
    run, data = texture_run
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("RGB", (_W, _H), (128, 128, 128)).save(folder / "blank.png")
    Image.new("RGB", (_W, _H), (0, 0, 0)).save(folder / "black.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (_H, _W, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.new("RGB", (3 * _H, _H), (128, 128, 128)).save(folder / "wide.png")  # also an odd shape
    out = tmp_path / "preds"
    assert main(["predict", str(run), str(folder), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    rows = {Path(r["path"]).name: r for r in csv.DictReader((out / "scores.csv").open())}
    assert {r["decision"] for r in rows.values()} == {"unknown"}
    assert "4 unknown" in captured.out
    assert "1 image(s) have an aspect ratio" in captured.err and "wide.png" in captured.err
    normal = sorted(data.glob("*/test/good/*.png"))
    preds = Detector.load(run, "cpu").predict([Image.open(f) for f in normal])
    assert sum(p.is_unknown for p in preds) <= len(preds) // 4
    assert all(0 < p.class_confidence <= 1 for p in preds)


def test_threshold_benchmark_compares_both_rules(tiny_run: Path, tmp_path: Path, monkeypatch, capsys):
    import importlib.util

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("bench_thresholds", bench / "thresholds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "t.json"
    assert module.main(["--run", str(tiny_run), "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    rules = {r["rule"].split(":")[0] for r in payload["rows"]}
    assert rules == {"before", "after"} and len(payload["rows"]) == 2 * 3  # 2 classes + all, per rule
    assert "defects caught" in capsys.readouterr().out


def test_a_bad_held_out_image_stops_training_before_anything_is_written(tmp_path: Path, capsys):
    from builders import make_mvtec

    root = make_mvtec(tmp_path / "d", {"bottle": {}}, n_train=10, n_good=0)
    for f in (root / "bottle" / "train" / "good").glob("*.png"):
        f.write_bytes(b"not an image")  # whichever is held out is unreadable
    out = tmp_path / "out"
    assert main(["train", "--data", f"mvtec:{root}", "--out", str(out), "--no-progress", *tiny_flags()]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train/good/" in err and "cannot read image" in err
    assert not out.exists() or not any(out.iterdir())
    assert main(["train", "--data", f"mvtec:{root}", "--out", str(out), "--no-progress",
                 *tiny_flags(batch_size=9)]) == 2
    assert "left after --calibration-split 0.2 held out 2 of 10" in capsys.readouterr().err


def test_content_box_and_inner_cells():
    from hgad.calibration import _inner
    from hgad.geometry import content_box

    assert content_box(200, 100, "squash") == (0.0, 0.0, 1.0, 1.0)
    assert content_box(200, 100, "pad") == (0.0, 0.25, 1.0, 0.75)
    assert _inner(0.25, 0.75, 8) == slice(2, 6) and _inner(0.3, 0.7, 8) == slice(3, 5)
    assert _inner(0.45, 0.5, 8) == slice(3, 4)  # no whole cell: the nearest one
