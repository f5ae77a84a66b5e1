"""Development dataset ``dev6``: six classes in the MVTec AD layout, made offline from bundled images.

A second, harder multi-class set beside the demo data, for choosing presets (issue 12). It is built
only from the sources the accuracy issue allows: scikit-image's ``immunohistochemistry``, ``cell``,
``page`` and ``chelsea``, and matplotlib's sample data ``jacksboro_fault_dem`` and ``grace_hopper``.
Other bundled images are kept for independent evaluation.

* textures (normal test crops come from a quarter of the source no training crop touches):
  ``tissue`` (colour stain microscopy), ``cells`` (grey microscopy), ``terrain`` (hill-shaded
  elevation model), ``page`` (scanned text);
* objects (every crop shows the whole subject, shifted a little): ``cat`` and ``portrait``.
  ``portrait`` has **image labels only** (no ``ground_truth/`` folder).

Defect kinds, taking turns: the demo's ``scratch``, ``stain``, ``patch`` and ``missing``
(:func:`hgad.demo.plant_defect`) plus ``faint``: a stain or scratch at 40 % of its strength, which is
hard for every detector. The same seed gives byte-identical files.

    python benchmarks/devdata.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from hgad.demo import plant_defect, resize_square

__all__ = ["DEV_CLASSES", "DEV_KINDS", "IMAGE_LABEL_ONLY", "make_dev_dataset"]

DEV_CLASSES = ("tissue", "cells", "terrain", "page", "cat", "portrait")
DEV_KINDS = ("scratch", "stain", "patch", "missing", "faint")
IMAGE_LABEL_ONLY = ("portrait",)
_TEXTURES = ("tissue", "cells", "terrain", "page")
_ROTATE = ("tissue", "cells", "terrain")  # isotropic: may turn by 90 degrees; text keeps its orientation
_FAINT = 0.4
_MARKER = "hgad development dataset dev6"


def _hillshade(elevation: np.ndarray) -> np.ndarray:
    """Grey shaded relief of an elevation model (light from the north-west), 0..255."""
    gy, gx = np.gradient(elevation.astype(np.float64), 30.0)
    slope = np.pi / 2 - np.arctan(np.hypot(gx, gy))
    aspect = np.arctan2(-gx, gy)
    az, alt = np.deg2rad(315.0), np.deg2rad(45.0)
    shade = np.sin(alt) * np.sin(slope) + np.cos(alt) * np.cos(slope) * np.cos(az - aspect)
    return np.clip(shade, 0, 1) * 255.0


def load_sources() -> dict[str, np.ndarray]:
    """Source images as float (H, W, C) arrays in 0..255 (C = 1 for grey)."""
    from matplotlib import cbook
    from skimage import data as skdata

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        hopper = np.asarray(Image.open(fh).convert("RGB"))
    raw = {
        "tissue": skdata.immunohistochemistry(),
        "cells": skdata.cell(),
        "terrain": _hillshade(cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"]),
        "page": skdata.page(),
        "cat": skdata.chelsea(),
        "portrait": hopper,
    }
    out = {}
    for name, arr in raw.items():
        arr = np.asarray(arr, dtype=np.float32)
        out[name] = arr[..., None] if arr.ndim == 2 else arr[..., :3]
    return out


def _box(rng: np.random.Generator, cls: str, shape: tuple[int, ...], held_out: bool) -> tuple[int, int, int]:
    h, w = shape[:2]
    if cls in _TEXTURES:  # held-out bottom-right quarter for normal test crops, the rest for training
        m = min(h, w) // 2
        side = int(rng.integers(int(0.4 * min(h, w)), m + 1))
        if held_out:
            return int(rng.integers(h - m, h - side + 1)), int(rng.integers(w - m, w - side + 1)), side
        if rng.random() < 0.5:
            return int(rng.integers(0, h - m - side + 1)), int(rng.integers(0, w - side + 1)), side
        return int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - m - side + 1)), side
    side = int(rng.integers(int(0.88 * min(h, w)), int(0.97 * min(h, w)) + 1))
    centre = w / 2 + rng.uniform(-0.04, 0.04) * w
    x0 = int(np.clip(round(centre - side / 2), 0, w - side))
    return int(rng.integers(0, h - side + 1)), x0, side


def _normal(rng: np.random.Generator, cls: str, src: np.ndarray, size: int, held_out: bool) -> np.ndarray:
    y0, x0, side = _box(rng, cls, src.shape, held_out)
    img = resize_square(src[y0:y0 + side, x0:x0 + side], size)
    if cls in _ROTATE:
        img = np.rot90(img, int(rng.integers(0, 4)))
    if cls in _TEXTURES and cls != "page" and rng.random() < 0.5:
        img = img[::-1]
    if cls != "page" and rng.random() < 0.5:
        img = img[:, ::-1]
    img = img * rng.uniform(0.94, 1.06)
    return np.ascontiguousarray(np.clip(np.rint(img), 0, 255))


def _defect(rng: np.random.Generator, img: np.ndarray, kind: str, cls: str,
            sources: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if kind != "faint":
        return plant_defect(rng, img, kind, cls, sources)
    base = "stain" if rng.random() < 0.5 else "scratch"
    for _ in range(100):
        strong, _mask = plant_defect(rng, img, base, cls, sources)
        out = np.clip(np.rint(img + _FAINT * (strong - img)), 0, 255)
        change = np.abs(out - img).max(axis=2)
        lum = img.mean(axis=2)
        dyn = max(float(np.percentile(lum, 95) - np.percentile(lum, 5)), 30.0)
        mask = change > max(0.03 * dyn, 3.0)
        if mask.sum() >= max(4, int(0.0005 * img.shape[0] ** 2)):
            return out, mask
    raise RuntimeError(f"could not plant a visible faint defect in a {cls} image")


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr.astype(np.uint8)
    Image.fromarray(img[..., 0] if img.shape[2] == 1 else img, "L" if img.shape[2] == 1 else "RGB").save(path)


def make_dev_dataset(out_dir: Path, seed: int = 0, *, n_train: int = 60, n_test_good: int = 12,
                     n_test_defect: int = 20, size: int = 256) -> Path:
    """Write ``dev6`` to ``out_dir`` (replaced whole if it exists) and return it."""
    out_dir = Path(out_dir)
    sources = load_sources()
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        for ci, cls in enumerate(DEV_CLASSES):
            src = sources[cls]
            for i in range(n_train):
                rng = np.random.default_rng([seed, 100 + ci, 0, i])
                _save(_normal(rng, cls, src, size, False), tmp / cls / "train" / "good" / f"{i:03d}.png")
            for i in range(n_test_good):
                rng = np.random.default_rng([seed, 100 + ci, 1, i])
                _save(_normal(rng, cls, src, size, True), tmp / cls / "test" / "good" / f"{i:03d}.png")
            for i in range(n_test_defect):
                rng = np.random.default_rng([seed, 100 + ci, 2, i])
                kind = DEV_KINDS[i % len(DEV_KINDS)]
                name = f"{i // len(DEV_KINDS):03d}"
                img, mask = _defect(rng, _normal(rng, cls, src, size, True), kind, cls, sources)
                _save(img, tmp / cls / "test" / kind / f"{name}.png")
                if cls not in IMAGE_LABEL_ONLY:
                    _save(mask[..., None] * 255.0, tmp / cls / "ground_truth" / kind / f"{name}_mask.png")
        (tmp / "README.txt").write_text(
            f"{_MARKER} (seed {seed}), written by benchmarks/devdata.py; see its docstring.\n",
            encoding="utf-8")
        if out_dir.exists():
            marker = out_dir / "README.txt"
            if not (marker.is_file() and marker.read_text(errors="replace").startswith(_MARKER)):
                raise SystemExit(f"{out_dir}: exists and was not written by devdata.py; not replaced")
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    make_dev_dataset(args.out_dir, args.seed)
    print(f"dev6 written to {args.out_dir}")


if __name__ == "__main__":
    main()
