"""Tiny on-disk datasets in each public layout, for the reader tests.

Images are small random RGB PNG/BMP files; masks mark a known rectangle (rows 4..11, columns
8..19 of a 32x32 image) so tests can check values, not only shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["MASK_BOX", "save_image", "save_mask", "make_mvtec", "make_btad", "make_mvtec3d",
           "make_visa", "make_folder"]

MASK_BOX = (4, 12, 8, 20)  # rows [4, 12), columns [8, 20)
_rng = np.random.default_rng(1234)


def save_image(path: Path, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Path:
    """A random image of ``size`` = (width, height) in ``mode``; parents are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = _rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").convert(mode).save(path)
    return path


def save_mask(path: Path, size: tuple[int, int] = (32, 32), value: int = 255) -> Path:
    """A mask with ``value`` inside :data:`MASK_BOX`, 0 elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    r0, r1, c0, c1 = MASK_BOX
    arr[r0:r1, c0:c1] = value
    Image.fromarray(arr, "L").save(path)
    return path


def make_mvtec(root: Path, classes: dict[str, dict[str, int]] | None = None, n_train: int = 3,
               n_good: int = 2) -> Path:
    """``classes``: name -> {defect type: count}; every class gets ``n_train`` / ``n_good`` normals."""
    classes = classes if classes is not None else {"bottle": {"broken": 2, "crack": 1}, "alpha": {"hole": 1}}
    for cls, defects in classes.items():
        for i in range(n_train):
            save_image(root / cls / "train" / "good" / f"{i:03d}.png")
        for i in range(n_good):
            save_image(root / cls / "test" / "good" / f"{i:03d}.png")
        for defect, n in defects.items():
            for i in range(n):
                save_image(root / cls / "test" / defect / f"{i:03d}.png")
                save_mask(root / cls / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def make_btad(root: Path) -> Path:
    """Classes 01 (png images, png masks) and 03 (bmp images, bmp masks)."""
    for cls, ext in (("01", ".png"), ("03", ".bmp")):
        for i in range(2):
            save_image(root / cls / "train" / "ok" / f"{i:04d}{ext}")
        save_image(root / cls / "test" / "ok" / f"0000{ext}")
        for i in range(2):
            save_image(root / cls / "test" / "ko" / f"{i:04d}{ext}")
            save_mask(root / cls / "ground_truth" / "ko" / f"{i:04d}{ext}")
    return root


def make_mvtec3d(root: Path) -> Path:
    """One class with xyz/ and validation/ folders that must be ignored."""
    cls = root / "cookie"
    for i in range(3):
        save_image(cls / "train" / "good" / "rgb" / f"{i:03d}.png")
        save_image(cls / "train" / "good" / "xyz" / f"{i:03d}.tiff")
    save_image(cls / "validation" / "good" / "rgb" / "000.png")
    save_image(cls / "test" / "good" / "rgb" / "000.png")
    save_mask(cls / "test" / "good" / "gt" / "000.png", value=0)
    for i in range(2):
        save_image(cls / "test" / "crack" / "rgb" / f"{i:03d}.png")
        save_mask(cls / "test" / "crack" / "gt" / f"{i:03d}.png")
        save_image(cls / "test" / "crack" / "xyz" / f"{i:03d}.tiff")
    (root / "readme.txt").write_text("not a class\n")
    return root


def make_visa(root: Path, rows: list[str] | None = None) -> Path:
    """Two objects; VisA masks use value 1 (not 255) to exercise binarisation."""
    lines = ["object,split,label,image,mask"]
    for obj in ("pcb1", "candle"):
        for i in range(3):
            rel = f"{obj}/Data/Images/Normal/{i:03d}.JPG"
            save_image(root / rel)
            lines.append(f"{obj},train,normal,{rel},")
        rel = f"{obj}/Data/Images/Normal/100.JPG"
        save_image(root / rel)
        lines.append(f"{obj},test,normal,{rel},")
        for i in range(2):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            save_image(root / rel)
            save_mask(root / mrel, value=1)
            lines.append(f"{obj},test,anomaly,{rel},{mrel}")
    lines += rows or []
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    return root


def make_folder(root: Path) -> Path:
    """``screws``: normal, normal_test, abnormal + mask (both naming styles); ``nuts``: no mask dir."""
    s = root / "screws"
    for i in range(3):
        save_image(s / "normal" / f"n{i}.png")
    save_image(s / "normal_test" / "t0.jpg")
    save_image(s / "abnormal" / "a0.png")
    save_image(s / "abnormal" / "a1.jpg")
    save_mask(s / "mask" / "a0.png")
    save_mask(s / "mask" / "a1_mask.bmp")
    n = root / "nuts"
    for i in range(2):
        save_image(n / "normal" / f"n{i}.png")
    save_image(n / "abnormal" / "x.png")
    return root
