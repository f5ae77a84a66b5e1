"""A small built-in anomaly-detection dataset, made offline from real photographs.

``hgad demo-data`` has to work on a fresh machine without downloads, yet a demo on synthetic
noise would say little about real use.  scikit-image ships a few CC0 photographs; this module
cuts normal images out of them (random crops, flips, rotations, mild brightness jitter) and
plants realistic defects of four kinds with exact pixel masks, written in the MVTec AD layout so
that ``mvtec:<dir>`` reads it like the real benchmark:

* ``scratch`` thin (1-3 px) curved lines, lighter or darker than their surroundings;
* ``stain``   a soft blob with a low-contrast brightness / colour shift;
* ``patch``   a piece cut from another class's photo, or from a far part of the same photo
  rotated and rescaled, pasted with its brightness matched to the surroundings;
* ``missing`` a region whose texture is removed (smoothed away) or warped (swirled).

Defect strength is drawn relative to the local dynamic range (about 10-35 %) so defects are not
trivially visible from colour alone.  Masks mark exactly the pixels whose value changed by more
than 5 % of that range, with small holes closed.  Everything is drawn from ``numpy`` generators
seeded by (seed, class, split, image), so one seed always gives byte-identical PNG files.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from hgad.errors import ConfigError, InputError

__all__ = ["DEMO_CLASSES", "DEFECT_KINDS", "make_demo_dataset", "plant_defect", "resize_square"]

DEMO_CLASSES: tuple[str, ...] = ("brick", "coffee", "grass", "gravel")
DEFECT_KINDS: tuple[str, ...] = ("scratch", "stain", "patch", "missing")

_MARKER = "hgad demo dataset"
_TEXTURES = ("brick", "grass", "gravel")  # held-out test region; "coffee" is an object class
_ISOTROPIC = ("grass", "gravel")  # may be turned by 90 degrees; bricks keep their orientation
_COFFEE_CENTRE_X = 277  # horizontal centre of the cup and saucer in skimage.data.coffee()
_SOURCES = {
    "brick": "skimage.data.brick(): CC0, from CC0Textures (Bricks25)",
    "coffee": "skimage.data.coffee(): CC0 by the photographer (Rachel Michetti), Pikolo Espresso Bar",
    "grass": "skimage.data.grass(): CC0, from DeviantArt (linolafett, Grass-01)",
    "gravel": "skimage.data.gravel(): CC0, from CC0Textures (Gravel04)",
}
Rng = np.random.Generator
Box = tuple[int, int, int]  # (y0, x0, side)


def _load_sources() -> dict[str, np.ndarray]:
    """The source photographs as float (H, W, C) arrays in 0..255 (C = 1 for grey)."""
    from skimage import data as skdata

    out = {}
    for name in DEMO_CLASSES:
        arr = np.asarray(getattr(skdata, name)(), dtype=np.float32)
        out[name] = arr[..., None] if arr.ndim == 2 else arr[..., :3]
    return out


# ---------------------------------------------------------------------------------------------
# Normal images
# ---------------------------------------------------------------------------------------------

def _texture_box(rng: Rng, shape: tuple[int, ...], held_out: bool) -> Box:
    """A square crop: inside the bottom-right quarter (held out for test) or outside it (train)."""
    h, w = shape[:2]
    m = min(h, w) // 2
    side = int(rng.integers(int(0.35 * min(h, w)), m + 1))
    if held_out:
        return int(rng.integers(h - m, h - side + 1)), int(rng.integers(w - m, w - side + 1)), side
    if rng.random() < 0.5:  # top band, full width
        return int(rng.integers(0, h - m - side + 1)), int(rng.integers(0, w - side + 1)), side
    return int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - m - side + 1)), side


def _object_box(rng: Rng, shape: tuple[int, ...]) -> Box:
    """A large crop that always shows the whole object, shifted a little."""
    h, w = shape[:2]
    side = int(rng.integers(int(0.86 * min(h, w)), int(0.96 * min(h, w)) + 1))
    x0 = int(np.clip(round(_COFFEE_CENTRE_X - side / 2 + rng.uniform(-20, 20)), 0, w - side))
    return int(rng.integers(0, h - side + 1)), x0, side


def resize_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Float (H, W, C) in 0..255 -> (size, size, C) with Lanczos, through 8-bit PIL images."""
    chans = [Image.fromarray(np.clip(np.rint(arr[..., c]), 0, 255).astype(np.uint8), "L")
             .resize((size, size), Image.Resampling.LANCZOS) for c in range(arr.shape[2])]
    return np.stack([np.asarray(c, dtype=np.float32) for c in chans], axis=2)


def _normal_image(rng: Rng, cls: str, src: np.ndarray, size: int, held_out: bool) -> np.ndarray:
    if cls in _TEXTURES:
        y0, x0, side = _texture_box(rng, src.shape, held_out)
    else:
        y0, x0, side = _object_box(rng, src.shape)
    img = resize_square(src[y0:y0 + side, x0:x0 + side], size)
    if cls in _TEXTURES:
        img = np.rot90(img, int(rng.integers(0, 4)) if cls in _ISOTROPIC else 2 * int(rng.integers(0, 2)))
        if rng.random() < 0.5:
            img = img[::-1]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = img * rng.uniform(0.93, 1.07)
    return np.ascontiguousarray(np.clip(np.rint(img), 0, 255))


# ---------------------------------------------------------------------------------------------
# Defects: each returns the new image and whether its mask is a filled region
# ---------------------------------------------------------------------------------------------

def _dynamic_range(img: np.ndarray) -> float:
    lum = img.mean(axis=2)
    return float(max(np.percentile(lum, 95) - np.percentile(lum, 5), 30.0))


def _blob(rng: Rng, size: int, radius: float) -> np.ndarray:
    """An irregular filled region: the union of 2-4 random ellipses around a random centre."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    out = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(2, 5))):
        oy, ox = rng.normal(0, radius * 0.45, 2)
        ry, rx = rng.uniform(0.45, 1.0, 2) * radius
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy - oy, xx - cx - ox
        u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        out |= (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    return out


def _scratch(rng: Rng, img: np.ndarray, cls: str, sources: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
    size = img.shape[0]
    n, sup = 32, 4
    step = rng.uniform(0.25, 0.6) * size / n
    angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.1, n))
    pts = rng.uniform(0.2, 0.8, 2) * size + np.cumsum(np.stack([np.cos(angles), np.sin(angles)], 1) * step, 0)
    width = int(rng.integers(1, 4)) * max(1, round(size / 256))
    canvas = Image.new("L", (size * sup, size * sup), 0)
    ImageDraw.Draw(canvas).line([(float(x) * sup, float(y) * sup) for x, y in pts], fill=255,
                                width=width * sup, joint="curve")
    alpha = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    amp = rng.uniform(0.15, 0.35) * _dynamic_range(img) * rng.choice([-1.0, 1.0])
    return img + amp * alpha[..., None], False


def _stain(rng: Rng, img: np.ndarray, cls: str, sources: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
    size = img.shape[0]
    radius = rng.uniform(0.07, 0.17) * size
    alpha = ndimage.gaussian_filter(_blob(rng, size, radius).astype(np.float32), radius * 0.3)
    alpha /= max(float(alpha.max()), 1e-6)
    amp = rng.uniform(0.12, 0.35) * _dynamic_range(img)
    if img.shape[2] == 1:
        shift = np.array([amp * rng.choice([-1.0, 1.0])], np.float32)
    else:  # mostly a brightness change, with a mild random tint
        direction = rng.choice([-1.0, 1.0]) + rng.normal(0, 0.5, 3)
        shift = (amp * direction / np.linalg.norm(direction)).astype(np.float32)
    return img + alpha[..., None] * shift, True


def _as_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    if arr.shape[2] == channels:
        return arr
    if channels == 1:
        return (arr @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    return np.repeat(arr, 3, axis=2)


def _patch(rng: Rng, img: np.ndarray, cls: str, sources: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
    size = img.shape[0]
    others = [c for c in sources if c != cls]
    from_other = rng.random() < 0.6
    src = sources[others[int(rng.integers(len(others)))]] if from_other else sources[cls]
    h, w = src.shape[:2]
    side = int(rng.integers(int(0.2 * min(h, w)), int(0.5 * min(h, w)) + 1))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    piece = _as_channels(resize_square(src[y0:y0 + side, x0:x0 + side], size), img.shape[2])
    if not from_other:  # same photo: a far region, turned and rescaled so its structure differs
        piece = np.rot90(piece, int(rng.integers(1, 4)))
    radius = rng.uniform(0.08, 0.18) * size
    if rng.random() < 0.5:
        region = _blob(rng, size, radius)
    else:
        region = np.zeros((size, size), bool)
        hh, ww = (rng.uniform(0.9, 2.0, 2) * radius).astype(int)
        cy, cx = rng.integers(0, size - hh), rng.integers(0, size - ww)
        region[cy:cy + hh, cx:cx + ww] = True
    inside = region[..., None]
    local = img[region].mean(axis=0)
    piece = (piece - piece[region].mean(axis=0)) * rng.uniform(0.7, 1.2) + local
    piece = piece + rng.uniform(-0.15, 0.15) * _dynamic_range(img)
    return np.where(inside, piece, img), True


def _missing(rng: Rng, img: np.ndarray, cls: str, sources: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
    size = img.shape[0]
    radius = rng.uniform(0.07, 0.18) * size
    region = _blob(rng, size, radius)
    alpha = np.clip(ndimage.gaussian_filter(region.astype(np.float32), 1.5) * 1.5, 0, 1)[..., None]
    if rng.random() < 0.5:  # texture removed: smoothed away, like a filled-in hole
        filled = ndimage.gaussian_filter(img, sigma=(radius * 0.5, radius * 0.5, 0))
        return alpha * filled + (1 - alpha) * img, True
    # texture deformed: swirl the neighbourhood of the region's centre
    cy, cx = np.argwhere(region).mean(axis=0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    strength = rng.choice([-1.0, 1.0]) * rng.uniform(1.5, 3.0)
    theta = strength * np.exp(-(dy**2 + dx**2) / (2 * (radius * 0.7) ** 2))
    sy = cy + dy * np.cos(theta) - dx * np.sin(theta)
    sx = cx + dy * np.sin(theta) + dx * np.cos(theta)
    warped = np.stack([ndimage.map_coordinates(img[..., c], [sy, sx], order=1, mode="reflect")
                       for c in range(img.shape[2])], axis=2)
    fade = np.clip((1.6 * radius - np.sqrt(dy**2 + dx**2)) / (0.3 * radius), 0, 1)[..., None]
    return fade * warped + (1 - fade) * img, True


_DEFECTS: dict[str, Callable[..., tuple[np.ndarray, bool]]] = {
    "scratch": _scratch, "stain": _stain, "patch": _patch, "missing": _missing,
}


def _change_mask(before: np.ndarray, after: np.ndarray, filled: bool) -> np.ndarray:
    """Pixels changed by more than 5 % of the dynamic range, small gaps closed."""
    changed = np.abs(after - before).max(axis=2) > max(0.05 * _dynamic_range(before), 4.0)
    padded = np.pad(changed, 2)
    closed = ndimage.binary_closing(padded, structure=np.ones((3, 3), bool))[2:-2, 2:-2]
    return ndimage.binary_fill_holes(closed) if filled else closed


def plant_defect(rng: Rng, img: np.ndarray, kind: str, cls: str,
                 sources: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Plant one defect of ``kind`` in ``img`` of class ``cls`` (float (H, W, C) in 0..255); return it and its mask.

    ``sources`` maps class names to their source photographs (``patch`` pastes from the others).
    Redrawn until the mask has a visible size.
    """
    size = img.shape[0]
    min_area = max(4, int(0.0005 * size * size))
    for _ in range(100):
        out, filled = _DEFECTS[kind](rng, img, cls, sources)
        out = np.clip(np.rint(out), 0, 255)
        mask = _change_mask(img, out, filled)
        if mask.sum() >= min_area:
            return out, mask
    raise RuntimeError(f"could not plant a visible {kind} defect in a {cls} image")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr.astype(np.uint8)
    Image.fromarray(img[..., 0] if img.shape[2] == 1 else img, "L" if img.shape[2] == 1 else "RGB").save(path)


def _is_demo(folder: Path) -> bool:
    readme = folder / "README.txt"
    if not readme.is_file() or not readme.read_text(errors="replace").startswith(_MARKER):
        return False
    return all(p.name in (*DEMO_CLASSES, "README.txt") for p in folder.iterdir())


def _readme(seed: int, counts: dict[str, dict[str, int]], size: int) -> str:
    lines = [
        f"{_MARKER} (MVTec AD layout), written by hgad.demo.make_demo_dataset(seed={seed}, size={size}).",
        "",
        "Normal images are random crops of real photographs bundled with scikit-image, resized to",
        f"{size}x{size} with Lanczos, randomly flipped (grass and gravel also turned by 90 degrees)",
        "and given a mild brightness jitter.  For the texture classes the normal test images come from",
        "the bottom-right quarter of the photograph, which no training crop touches; 'coffee' is an",
        "object class whose crops always show the whole cup.",
        "",
        "Defects (test/<kind>/, masks in ground_truth/<kind>/<name>_mask.png, 0/255):",
        "  scratch  thin curved lines, lighter or darker by 15-35% of the dynamic range",
        "  stain    soft blob with a brightness or colour shift of 12-35% of the dynamic range",
        "  patch    piece of another class's photo (or a far, rotated part of the same photo) pasted",
        "           with its mean brightness matched to the surroundings",
        "  missing  region whose texture is smoothed away or swirled",
        "Masks mark the pixels whose value changed by more than 5% of the dynamic range, with small",
        "holes closed.  The same seed always gives byte-identical files.",
        "",
        "Counts: class train / test good / test defect",
    ]
    lines += [f"  {c}: {n['train']} / {n['test_good']} / {n['test_defect']}" for c, n in counts.items()]
    lines += ["", "Sources and licences (all CC0 / public domain):"]
    lines += [f"  {c}: {_SOURCES[c]}" for c in DEMO_CLASSES]
    lines += ["The generated images are derived from these CC0 photographs and carry no further restriction."]
    return "\n".join(lines) + "\n"


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "is a file; expected a folder for the demo dataset")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_demo(out_dir):
        raise InputError(out_dir, "folder is not empty and is not an hgad demo dataset; "
                                  "choose an empty or new folder")


def make_demo_dataset(out_dir: Path, seed: int = 0, *, n_train: int = 40, n_test_good: int = 10,
                      n_test_defect: int = 18, size: int = 256,
                      progress: bool = False) -> dict[str, dict[str, int]]:
    """Write the demo dataset (MVTec AD layout) to ``out_dir``; return per-class image counts.

    Defect kinds take turns (scratch, stain, patch, missing, ...).  The folder is written beside
    ``out_dir`` first and moved in place at the end, so an interrupted run leaves nothing half
    written; an earlier demo dataset in ``out_dir`` is replaced, any other non-empty folder is
    refused with an InputError.
    """
    if seed < 0:
        raise ConfigError("--seed", f"must be >= 0, got {seed}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ConfigError("demo", "need n_train >= 1 and non-negative test counts")
    if size < 32:
        raise ConfigError("demo", f"image size must be >= 32, got {size}")
    out_dir = Path(out_dir).expanduser()
    _check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    sources = _load_sources()
    counts = {c: {"train": n_train, "test_good": n_test_good, "test_defect": n_test_defect}
              for c in DEMO_CLASSES}
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: the dataset keeps the user's default permissions
    try:
        total = len(DEMO_CLASSES) * (n_train + n_test_good + n_test_defect)
        with tqdm(total=total, desc="demo data", unit="img", disable=not progress) as bar:
            for ci, cls in enumerate(DEMO_CLASSES):
                src = sources[cls]
                for i in range(n_train):
                    rng = np.random.default_rng([seed, ci, 0, i])
                    _save(_normal_image(rng, cls, src, size, held_out=False), tmp / cls / "train" / "good" /
                          f"{i:03d}.png")
                    bar.update()
                for i in range(n_test_good):
                    rng = np.random.default_rng([seed, ci, 1, i])
                    _save(_normal_image(rng, cls, src, size, held_out=True), tmp / cls / "test" / "good" /
                          f"{i:03d}.png")
                    bar.update()
                for i in range(n_test_defect):
                    rng = np.random.default_rng([seed, ci, 2, i])
                    kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
                    name = f"{i // len(DEFECT_KINDS):03d}"
                    img, mask = plant_defect(rng, _normal_image(rng, cls, src, size, held_out=True), kind,
                                              cls, sources)
                    _save(img, tmp / cls / "test" / kind / f"{name}.png")
                    _save(mask[..., None] * 255.0, tmp / cls / "ground_truth" / kind / f"{name}_mask.png")
                    bar.update()
        (tmp / "README.txt").write_text(_readme(seed, counts, size), encoding="utf-8")
        _check_target(out_dir)
        if out_dir.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "data")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return counts
