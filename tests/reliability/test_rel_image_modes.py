"""Unusual but valid images must *work* end to end: 16-bit and palette PNGs, CMYK JPEGs, grey, grey+alpha
and RGBA images, non-square sizes, and masks that are palette, 16-bit or anti-aliased (non-binary).

One tiny model is trained on such a dataset with ``hgad train``, evaluated with ``hgad test`` (HTML
report included: it draws the test images) and used by ``hgad predict`` (which draws overlays on
them). The same picture stored in encodings that hold exactly the same pixels must get exactly the
same score: an independent check that every mode is read as the same RGB image.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from relhelp import run_cli

from conftest import tiny_flags

W, H = 40, 32  # non-square on purpose: resize of the shorter side, then centre crop


def _grey(seed: int) -> np.ndarray:
    """A smooth grey picture with a little texture (JPEG-friendly), values 0..255."""
    y, x = np.mgrid[0:H, 0:W]
    rng = np.random.default_rng(seed)
    base = 128 + 60 * np.sin(x / (3 + seed % 4)) * np.cos(y / 5) + rng.normal(0, 8, (H, W))
    return np.clip(base, 0, 255).astype(np.uint8)


def _rgb(seed: int) -> np.ndarray:
    g = _grey(seed).astype(np.int16)
    return np.clip(np.stack([g, (g * 3) // 4 + 20, 255 - g], axis=2), 0, 255).astype(np.uint8)


def save_as(path: Path, kind: str, seed: int) -> Path:
    """Write picture ``seed`` in one of the encodings below; returns the path (suffix adjusted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    g, rgb = _grey(seed), _rgb(seed)
    if kind == "png16":  # 16-bit grey, v * 257 is exactly the 8-bit value v
        Image.fromarray(g.astype(np.uint16) * 257).save(path.with_suffix(".png"))
    elif kind == "grey":
        Image.fromarray(g, "L").save(path.with_suffix(".png"))
    elif kind == "grey-alpha":
        la = Image.merge("LA", [Image.fromarray(g, "L"), Image.new("L", (W, H), 30)])
        la.save(path.with_suffix(".png"))
    elif kind == "palette":  # a grey palette: index v is colour (v, v, v), exact
        im = Image.fromarray(g, "P")
        im.putpalette([v for i in range(256) for v in (i, i, i)])
        im.save(path.with_suffix(".png"))
    elif kind == "rgba":
        alpha = np.full((H, W, 1), 77, np.uint8)
        Image.fromarray(np.concatenate([np.repeat(g[..., None], 3, 2), alpha], 2), "RGBA").save(
            path.with_suffix(".png"))
    elif kind == "cmyk-jpeg":
        Image.fromarray(rgb, "RGB").convert("CMYK").save(path.with_suffix(".jpg"), quality=95)
    elif kind == "rgb-jpeg":
        Image.fromarray(rgb, "RGB").save(path.with_suffix(".jpg"), quality=95)
    elif kind == "palette-rgb":  # an adaptive colour palette (lossy quantisation, still a valid input)
        Image.fromarray(rgb, "RGB").quantize(64).save(path.with_suffix(".png"))
    else:
        raise ValueError(kind)
    return path.with_suffix(".jpg" if kind.endswith("jpeg") else ".png")


EXACT_GREY = ("grey", "png16", "grey-alpha", "palette", "rgba")  # same pixels, five encodings
KINDS = (*EXACT_GREY, "cmyk-jpeg", "rgb-jpeg", "palette-rgb")


def _mask(path: Path, kind: str) -> Path:
    """A defect rectangle as a palette, 16-bit or anti-aliased grey mask (all must be read as binary)."""
    arr = np.zeros((H, W), np.uint8)
    arr[8:20, 10:26] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "palette":
        im = Image.fromarray(arr, "P")
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        im.save(path)
    elif kind == "png16":
        Image.fromarray(arr.astype(np.uint16) * 65535).save(path)
    else:  # anti-aliased edge: values 1..255, non-binary
        soft = arr * 255
        soft[7, 10:26] = 40
        soft[20, 10:26] = 3
        Image.fromarray(soft, "L").save(path)
    return path


def _dataset(root: Path) -> Path:
    """Two classes; 'mixed' uses every encoding for training, test and masks."""
    mixed = root / "mixed"
    for i in range(8):
        save_as(mixed / "train" / "good" / f"{i:03d}", KINDS[i % len(KINDS)], seed=i)
    save_as(mixed / "test" / "good" / "000", "png16", seed=20)
    save_as(mixed / "test" / "good" / "001", "cmyk-jpeg", seed=21)
    for i, (kind, mask) in enumerate((("palette", "palette"), ("rgba", "png16"), ("grey-alpha", "soft"))):
        img = save_as(mixed / "test" / "scratch" / f"{i:03d}", kind, seed=30 + i)
        _mask(mixed / "ground_truth" / "scratch" / f"{img.stem}_mask.png", mask)
    plain = root / "plain"
    for i in range(4):
        save_as(plain / "train" / "good" / f"{i:03d}", "rgb-jpeg", seed=50 + i)
    save_as(plain / "test" / "good" / "000", "rgb-jpeg", seed=60)
    return root


@pytest.fixture(scope="module")
def modes_run(tmp_path_factory) -> tuple[Path, Path]:
    root = _dataset(tmp_path_factory.mktemp("modes") / "data")
    run = root.parent / "run"
    from hgad.cli import main

    assert main(["train", "--data", f"mvtec:{root}", "--out", str(run), "--no-progress", *tiny_flags()]) == 0
    return root, run


def test_train_and_test_on_every_image_mode(modes_run, tmp_path: Path, capsys):
    root, run = modes_run
    rc, err, out = run_cli(["test", run, "--out", tmp_path / "rep", "--no-progress"], capsys)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    mixed = metrics["per_class"]["mixed"]
    # pixel metrics exist only when every anomalous image's (palette / 16-bit / soft) mask was read
    assert math.isfinite(mixed["image_auroc"]) and math.isfinite(mixed["pixel_auroc"])
    assert (tmp_path / "rep" / "report.html").stat().st_size > 1000
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for r in log for k, v in r.items() if k.startswith("loss_"))


def test_predict_gives_equal_scores_to_equal_pixels_in_any_encoding(modes_run, tmp_path: Path, capsys):
    _, run = modes_run
    folder = tmp_path / "in"
    files = {kind: save_as(folder / kind, kind, seed=99) for kind in KINDS}
    rc, err, out = run_cli(["predict", run, folder, "--out", tmp_path / "pred", "--no-progress"], capsys)
    assert rc == 0, err
    assert f"scored {len(KINDS)} of {len(KINDS)} images" in out
    rows = {Path(r["path"]).name: r for r in csv.DictReader((tmp_path / "pred" / "scores.csv").open())}
    assert set(rows) == {f.name for f in files.values()}
    scores = {kind: float(rows[f.name]["score"]) for kind, f in files.items()}
    assert all(rows[f.name]["error"] == "" for f in files.values())
    assert all(math.isfinite(s) and s >= 0 for s in scores.values())
    for kind in EXACT_GREY[1:]:
        assert scores[kind] == scores["grey"], (kind, scores)
    assert scores["rgb-jpeg"] != scores["grey"]  # a different picture: the equalities above are not trivial
    for f in files.values():  # an overlay was drawn for every mode, at the map size
        with Image.open(tmp_path / "pred" / "overlays" / f"{f.stem}.png") as im:
            assert im.mode == "RGB" and im.size[0] > 0
