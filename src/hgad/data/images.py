"""Image files: find, decode (safely) and preprocess them, and read masks.

Everything that turns a file into a tensor lives here, without any dataset scanning: ``hgad predict``,
the Python API and the ONNX detector need only this. Every decoding failure becomes an
:class:`~hgad.errors.InputError` naming the file; only regular files are read, and images larger
than :data:`MAX_PIXELS` are refused from their header, before any pixel is decoded.

Masks are binarised with ``> 0`` (any non-zero value, in any channel, is anomalous), so VisA's
multi-valued masks and anti-aliased user masks are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hgad.errors import InputError, brief
from hgad.geometry import to_square

__all__ = ["IMAGE_EXTS", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_NORM", "MAX_PIXELS", "Norm", "open_image",
           "check_regular", "header_size", "check_pair_sizes", "size_mismatch", "preprocess", "load_image",
           "mask_tensor", "load_mask", "is_image_file", "list_image_files"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 100_000_000  # larger images are refused before decoding (a 10000x10000 photo is allowed)
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own decompression-bomb guard, for any other reader


def is_image_file(p: Path) -> bool:
    """A visible regular file with an image extension."""
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS


def open_image(path: Path) -> Image.Image:
    """Open and fully decode ``path``; every failure becomes an InputError naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        raise InputError(path, "is a folder; expected an image file")
    check_regular(path)
    if path.stat().st_size == 0:
        raise InputError(path, "cannot read image: empty file")
    try:
        with Image.open(path) as im:
            _check_pixels(path, im.size)
            im.load()
            return im.copy()
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(path, f"cannot read image: more than {MAX_PIXELS:,} pixels") from None
    except Image.UnidentifiedImageError:
        raise InputError(path, "cannot read image: not a recognised image format") from None
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, EOFError, struct.error...
        raise InputError(path, f"cannot read image: {brief(err)}") from None


def check_regular(path: Path) -> None:
    """Only regular files are read: a FIFO or a device would block or never end."""
    import stat

    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise InputError(path, f"cannot read image: {kind}, not a regular file")


def _check_pixels(path: Path, size: tuple[int, int]) -> None:
    """Refuse images too large to decode safely, from the header (before any pixel is decoded)."""
    w, h = size
    if w < 1 or h < 1:
        raise InputError(path, f"cannot read image: size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise InputError(path, f"cannot read image: {w}x{h} is {w * h:,} pixels, more than the limit of "
                               f"{MAX_PIXELS:,}")


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    check_regular(path)
    if path.stat().st_size == 0:
        raise InputError(path, "cannot read image: empty file")
    try:
        with Image.open(path) as im:
            return im.size
    except Image.UnidentifiedImageError:
        raise InputError(path, "cannot read image: not a recognised image format") from None
    except Exception as err:
        raise InputError(path, f"cannot read image: {brief(err)}") from None


def size_mismatch(mask_path: Path, mask_size: tuple[int, int], image_path: Path,
                   image_size: tuple[int, int]) -> InputError:
    """The error for a mask whose size differs from its image's."""
    return InputError(mask_path, f"mask size {mask_size[0]}x{mask_size[1]} differs from image size "
                                 f"{image_size[0]}x{image_size[1]} of {image_path}")


def check_pair_sizes(image_path: Path, mask_path: Path) -> None:
    """Image and mask must have the same size (read from the headers, nothing decoded)."""
    isize, msize = header_size(image_path), header_size(mask_path)
    if isize != msize:
        raise size_mismatch(mask_path, msize, image_path, isize)


def _grey_to_uint8(im: Image.Image) -> Image.Image:
    """High-bit-depth / float grey (I;16*, I, F) to 8-bit L, scaled rather than clipped.

    16-bit modes are divided by 257 (65535 -> 255).  ``I`` and ``F`` carry no bit depth: values in
    [0, 1] (F) are taken as unit range, values up to 255 as 8-bit, up to 65535 as 16-bit, and
    anything else is min-max scaled.
    """
    arr = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16"):
        scaled = arr / 257.0
    else:
        lo, hi = float(arr.min()), float(arr.max())
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = arr
        elif lo >= 0.0 and hi <= 65535.0:
            scaled = arr / 257.0
        else:
            scaled = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: grey stacked to 3 channels, alpha dropped, palette applied."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "RGBX", "RGBa"):
        return Image.merge("RGB", im.split()[:3])
    if mode in ("P", "PA"):
        return _to_rgb(im.convert("RGBA"))
    if mode in ("LA", "La"):
        return im.getchannel("L").convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _grey_to_uint8(im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, ...


Norm = tuple[tuple[float, float, float], tuple[float, float, float]]
IMAGENET_NORM: Norm = (IMAGENET_MEAN, IMAGENET_STD)


def preprocess(img: Image.Image, img_size: int, norm: Norm, resize: str = "crop") -> torch.Tensor:
    """PIL image (any mode) -> (3, S, S) float32 tensor, normalised with ``norm = (mean, std)``.

    Made square by ``resize`` (:func:`hgad.geometry.to_square`, Lanczos; ``pad`` borders are the mean
    colour, i.e. 0 after normalisation). ``norm`` is
    the backbone's own input normalisation (``FeatureExtractor.norm``, from timm's ``pretrained_cfg``):
    EfficientNet-Lite was trained with 0.5/0.5, not ImageNet's statistics.
    """
    fill = tuple(round(255 * m) for m in norm[0])
    rgb = to_square(_to_rgb(img), img_size, resize, Image.Resampling.LANCZOS, fill)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    mean = np.asarray(norm[0], dtype=np.float32)
    std = np.asarray(norm[1], dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1)))


def load_image(path: Path, img_size: int, norm: Norm, resize: str = "crop") -> torch.Tensor:
    """Read an image file and :func:`preprocess` it; unreadable files raise InputError."""
    return preprocess(open_image(path), img_size, norm, resize)


def _mask_to_binary(im: Image.Image) -> Image.Image:
    """A mask in any mode -> L image with 0 / 255 (any non-zero colour channel is anomalous)."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    arr = np.asarray(im)
    if arr.ndim == 3:
        keep = 1 if im.mode in ("LA", "La") else min(arr.shape[2], 3)  # ignore alpha
        arr = arr[..., :keep].max(axis=2)
    return Image.fromarray(np.where(arr > 0, 255, 0).astype(np.uint8), mode="L")


def mask_tensor(im: Image.Image, size: int, resize: str = "crop") -> torch.Tensor:
    """A decoded mask as (1, S, S) float32 in {0, 1}, with the geometry of :func:`preprocess`."""
    binary = to_square(_mask_to_binary(im), size, resize, Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(binary) > 0).astype(np.float32))[None]


def load_mask(path: Path, size: int, resize: str = "crop") -> torch.Tensor:
    """Read a mask file -> (1, S, S) float32 in {0, 1}.

    Non-binary masks are accepted and binarised with ``> 0``; the geometry (``resize``, nearest
    resampling) matches :func:`preprocess` so mask and image stay aligned.
    """
    return mask_tensor(open_image(path), size, resize)


def list_image_files(paths: Sequence[Path]) -> list[Path]:
    """Image files given directly or found (recursively, sorted) in the given folders.

    Used by ``hgad predict``; a missing path, a non-image file or no image at all is an InputError.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise InputError(p, "does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if is_image_file(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            out += found
        elif p.suffix.lower() in IMAGE_EXTS:
            out.append(p)
        else:
            raise InputError(p, f"not an image file (expected one of {', '.join(IMAGE_EXTS)})")
    unique = list(dict.fromkeys(out))
    if not unique:
        raise InputError(Path(paths[0]) if paths else Path("."),
                         f"no image files found (extensions {', '.join(IMAGE_EXTS)})")
    return unique
