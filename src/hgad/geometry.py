"""How an image of any shape becomes the model's square input, and how a map goes back to the image.

Three modes (``--resize``): ``squash`` (default) resizes the whole image to the square (aspect ratio
not kept, as anomalib does), ``pad`` scales the longer side to the square and fills the borders, ``crop``
resizes the shorter side and keeps the centre (hgad 0.1; the borders of a non-square image are never
seen). :func:`map_to_original` inverts each one, so maps, overlays and masks line up with the file.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["RESIZE_MODES", "ASPECT_TOLERANCE", "to_square", "map_to_original", "resized_size", "resize_crop",
           "aspect_outlier", "content_box"]

RESIZE_MODES = ("squash", "crop", "pad")
_FULL_RESIZE_MAX = 16  # aspect ratios up to 16:1 are resized whole (the historical, bit-exact path)
ASPECT_TOLERANCE = 1.25  # an aspect ratio beyond the training images' range by this factor is warned about


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Size after scaling the shorter side to ``size`` (aspect kept, longer side >= size)."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def resize_crop(im: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Shorter side to ``size`` then centre crop to ``size`` x ``size``.

    Beyond an aspect ratio of 16:1 only the kept square is computed (``resize`` with a source box, the
    same sample positions up to rounding): a 1x20000 strip must not become a 256x5120000 intermediate.
    """
    new_w, new_h = resized_size(im.width, im.height, size)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if new_w * new_h <= _FULL_RESIZE_MAX * size * size:  # usual shapes: resize all, then crop
        if (new_w, new_h) != im.size:
            im = im.resize((new_w, new_h), resample=resample)
        return im.crop((left, top, left + size, top + size))
    sx, sy = im.width / new_w, im.height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return im.resize((size, size), resample=resample, box=box)


def _pad_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, inner width, inner height) of the image inside the padded square."""
    scale = size / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    return (size - w) // 2, (size - h) // 2, w, h


def to_square(im: Image.Image, size: int, mode: str, resample: Image.Resampling,
              fill: int | tuple[int, ...] = 0) -> Image.Image:
    """``im`` as a ``size`` x ``size`` image by ``mode``; ``fill`` colours the borders of ``pad``."""
    if mode == "crop":
        return resize_crop(im, size, resample)
    if mode == "squash":
        return im if im.size == (size, size) else im.resize((size, size), resample=resample)
    if mode != "pad":
        raise ValueError(f"unknown resize mode {mode!r}; known: {', '.join(RESIZE_MODES)}")
    left, top, w, h = _pad_box(im.width, im.height, size)
    out = Image.new(im.mode, (size, size), fill)
    out.paste(im.resize((w, h), resample=resample) if (w, h) != im.size else im, (left, top))
    return out


def content_box(width: int, height: int, mode: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) as fractions of the square: the part that shows the image (``pad`` adds borders)."""
    if mode != "pad":
        return 0.0, 0.0, 1.0, 1.0
    s = 1 << 12
    left, top, w, h = _pad_box(width, height, s)
    return left / s, top / s, (left + w) / s, (top + h) / s


def map_to_original(amap: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """A square map (M, M) of an image preprocessed by ``mode``, as (height, width) in the file's pixels.

    ``crop`` never saw the borders of a non-square image: they are 0 (not scored) in the result.
    """
    m = amap.shape[0]
    src = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32), mode="F")
    if mode == "squash":
        return np.asarray(src.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    if mode == "pad":
        left, top, w, h = _pad_box(width, height, m * 4)  # in units of M/4 px: sub-pixel accurate box
        box = (left / 4, top / 4, (left + w) / 4, (top + h) / 4)
        return np.asarray(src.resize((width, height), Image.Resampling.BILINEAR, box=box), dtype=np.float32)
    if mode != "crop":
        raise ValueError(f"unknown resize mode {mode!r}; known: {', '.join(RESIZE_MODES)}")
    new_w, new_h = resized_size(width, height, m)
    sx, sy = width / new_w, height / new_h
    x0, y0 = (new_w - m) // 2 * sx, (new_h - m) // 2 * sy
    out_w, out_h = max(1, round(m * sx)), max(1, round(m * sy))
    inner = np.asarray(src.resize((out_w, out_h), Image.Resampling.BILINEAR), dtype=np.float32)
    full = np.zeros((height, width), np.float32)
    c0, r0 = round(x0), round(y0)
    full[r0:r0 + out_h, c0:c0 + out_w] = inner[:height - r0, :width - c0]
    return full


def aspect_outlier(width: int, height: int, train_range: tuple[float, float]) -> bool:
    """Whether ``width / height`` lies beyond the training images' aspect range by more than the tolerance."""
    lo, hi = train_range
    a = width / height
    return bool(a < lo / ASPECT_TOLERANCE or a > hi * ASPECT_TOLERANCE) and math.isfinite(a)
