"""``hgad predict``: score loose image files or folders with a trained run.

No dataset layout is needed and no image depends on another (deploy protocol). A file that cannot be
read is reported in ``scores.csv`` with its error and the others are still scored. Maps, overlays and
binary masks are written at each image's own size and coordinates (:func:`hgad.geometry.map_to_original`).
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from hgad.api import Detector
from hgad.data import list_image_files, open_image
from hgad.errors import ConfigError, InputError
from hgad.geometry import aspect_outlier, map_to_original
from hgad.io import atomic_write_bytes, atomic_write_text, check_output_folder
from hgad.report import overlay

__all__ = ["predict_paths", "map_png16", "SCORES_FILE", "PredictSummary", "OUTPUT_ENTRIES"]

SCORES_FILE = "scores.csv"


def map_png16(amap: np.ndarray, full_scale: float) -> bytes:
    """16-bit grey PNG of a map: pixel value v means score v / 65535 * full_scale."""
    q = np.clip(amap / full_scale, 0, 1) * 65535 if full_scale > 0 else np.zeros_like(amap)
    buf = io.BytesIO()
    Image.fromarray(np.round(q).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _files(paths: list[Path], out: Path) -> list[tuple[Path, str]]:
    """(image file, output name) of every input, in the order given.

    Folders are searched for images (never inside the output folder ``out``); files named explicitly
    are kept whatever their extension, so that a bad one is reported in scores.csv rather than
    silently skipped. The output name keeps the path relative to the folder given (prefixed with the
    folder's name when several paths are given), and is made unique per input.
    """
    out_resolved = Path(out).expanduser().resolve()
    found: list[tuple[Path, str]] = []
    several = len(paths) > 1
    for p in paths:
        p = Path(p).expanduser()
        if p.exists() and not p.is_dir():
            found.append((p, p.stem))
            continue
        files = [f for f in list_image_files([p]) if not _inside(f, out_resolved)]
        prefix = (p.resolve().name or "root") if several else ""
        for f in files:
            rel = f.relative_to(p)
            found.append((f, "/".join(x for x in (prefix, *rel.parent.parts, rel.stem) if x)))
    out_list: list[tuple[Path, str]] = []
    used: set[str] = set()
    seen: set[Path] = set()
    for f, name in found:
        key = f.resolve() if f.exists() else f
        if key in seen:  # the same file reached twice (a file and its folder): scored once
            continue
        seen.add(key)
        unique = name
        if unique.lower() in used:
            unique = f"{name}_{f.suffix.lstrip('.').lower() or 'noext'}"
        k = 2
        while unique.lower() in used:
            unique, k = f"{name}_{k}", k + 1
        used.add(unique.lower())
        out_list.append((f, unique))
    return out_list


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _write_outputs(out: Path, stem: str, image: Image.Image, amap: np.ndarray, threshold: float,
                   map_format: str, full_scale: float) -> tuple[str, str]:
    """Map, overlay and binary mask (``map > threshold``: white) of one image, all at its own size."""
    if map_format == "npy":
        buf = io.BytesIO()
        np.save(buf, amap.astype(np.float32))
        atomic_write_bytes(out / "maps" / f"{stem}.npy", buf.getvalue())
        map_name = f"maps/{stem}.npy"
    else:
        atomic_write_bytes(out / "maps" / f"{stem}.png", map_png16(amap, full_scale))
        map_name = f"maps/{stem}.png"
    buf = io.BytesIO()
    overlay(image, amap, full_scale).save(buf, format="PNG")
    atomic_write_bytes(out / "overlays" / f"{stem}.png", buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(np.where(amap > threshold, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    atomic_write_bytes(out / "masks" / f"{stem}.png", buf.getvalue())
    return map_name, f"masks/{stem}.png"


class PredictSummary(str):
    """The one-line summary printed by ``hgad predict``, with its counts as attributes."""

    n_files: int
    n_bad: int
    n_anomalous: int
    n_unknown: int


OUTPUT_ENTRIES = frozenset({SCORES_FILE, "maps", "overlays", "masks"})
_FIELDS = ["path", "class", "class_confidence", "score", "threshold", "decision", "is_anomalous", "unknown", "map",
           "mask", "png16_full_scale", "error"]


def predict_paths(run_dir: Path, paths: list[Path], out: Path, *, threshold: float | None = None,
                  class_name: str | None = None, map_format: str = "png16", batch_size: int = 8,
                  device: str = "auto", progress: bool = True, onnx: Path | None = None,
                  backbone_weights: str | None = None) -> PredictSummary:
    """Score every image under ``paths``; write maps, overlays and scores.csv to ``out``.

    The output folder is written whole into a temporary folder beside it and renamed into place at the
    end (an existing ``out`` must be empty or an earlier output of this command: it is replaced). With
    ``onnx`` (a file written by ``hgad export`` from ``run_dir``) the images go through onnxruntime.
    """
    from hgad.io import whole_folder

    if threshold is not None and not np.isfinite(threshold):
        raise ConfigError("--threshold", f"must be a finite number, got {threshold}")
    check_output_folder(out, OUTPUT_ENTRIES, "hgad predict output")
    files = _files(paths, out)  # missing paths fail before the model is loaded
    if not files:
        raise InputError(paths[0], "no image files found (the output folder is never scanned)")
    if onnx is not None:
        from hgad.export import OnnxDetector

        detector: Detector | OnnxDetector = OnnxDetector.load(onnx, device, run_dir=run_dir)
    else:
        overrides = {"backbone_weights": backbone_weights} if backbone_weights else {}
        detector = Detector.load(run_dir, device, **overrides)
    if class_name is not None and class_name not in detector.class_names:  # before anything is written
        raise ConfigError("--class", f"unknown class {class_name!r}; known: {', '.join(detector.class_names)}")
    with whole_folder(out) as work:
        rows, odd_shapes = _score_all(detector, files, work, threshold=threshold, class_name=class_name,
                                      map_format=map_format, batch_size=batch_size, progress=progress)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(work / SCORES_FILE, buf.getvalue())
    n_bad = sum(bool(r["error"]) for r in rows)
    n_anomalous = sum(r["decision"] == "anomalous" for r in rows)
    n_unknown = sum(r["decision"] == "unknown" for r in rows)
    if odd_shapes:
        train = detector.calibration.train_aspect
        print(f"hgad predict: warning: {len(odd_shapes)} image(s) have an aspect ratio (width/height) far from the "
              f"training images' ({train[0]:.2f} to {train[1]:.2f}), e.g. {odd_shapes[0]}; --resize "
              f"{detector.resize} shows the model something it never trained on", file=sys.stderr)
    summary = PredictSummary(f"scored {len(files) - n_bad} of {len(files)} images ({n_anomalous} anomalous, "
                             f"{n_unknown} unknown, {n_bad} unreadable); results in {out / SCORES_FILE}")
    summary.n_files, summary.n_bad, summary.n_anomalous, summary.n_unknown = len(files), n_bad, n_anomalous, n_unknown
    return summary


def _score_all(detector, files: list[tuple[Path, str]], out: Path, *, threshold: float | None,
               class_name: str | None, map_format: str, batch_size: int, progress: bool
               ) -> tuple[list[dict[str, str]], list[str]]:
    """scores.csv rows in input order, and the images whose aspect ratio the training images never had."""
    rows: list[dict[str, str] | None] = [None] * len(files)
    odd_shapes: list[str] = []
    calibration = getattr(detector, "calibration", None)  # ONNX models carry none: no unknown flags, no warning
    train_aspect = calibration.train_aspect if calibration is not None else None
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)
    for start in range(0, len(files), batch_size):
        chunk = list(enumerate(files[start:start + batch_size], start))
        images: list[tuple[int, Path, str, Image.Image]] = []
        for i, (f, name) in chunk:
            try:
                images.append((i, f, name, open_image(f)))
            except InputError as err:
                rows[i] = {**dict.fromkeys(_FIELDS, ""), "path": str(f), "error": err.problem}
        preds = detector.predict([im for *_, im in images], class_name=class_name, threshold=threshold) \
            if images else []
        for (i, f, name, im), pred in zip(images, preds):
            full_scale = 2 * pred.threshold if np.isfinite(pred.threshold) and pred.threshold > 0 \
                else float(pred.anomaly_map.max()) or 1.0
            amap = map_to_original(pred.anomaly_map, im.width, im.height, detector.resize)
            map_name, mask_name = _write_outputs(out, name, im, amap, pred.threshold, map_format, full_scale)
            if train_aspect is not None and aspect_outlier(im.width, im.height, train_aspect):
                odd_shapes.append(f"{f} ({im.width}x{im.height})")
            rows[i] = {"path": str(f), "class": pred.class_name, "class_confidence": f"{pred.class_confidence:.4g}",
                       "score": f"{pred.score:.6g}", "threshold": f"{pred.threshold:.6g}",
                       "decision": pred.decision, "is_anomalous": str(int(pred.is_anomalous)),
                       "unknown": str(int(pred.is_unknown)), "map": map_name, "mask": mask_name,
                       "png16_full_scale": f"{full_scale:.6g}", "error": ""}
        bar.update(len(chunk))
    bar.close()
    return [r for r in rows if r is not None], odd_shapes
