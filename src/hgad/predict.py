"""``hgad predict``: score loose image files or folders with a trained run.

No dataset layout is needed and no image depends on another (deploy protocol). A file that cannot be
read is reported in ``scores.csv`` with its error and the others are still scored.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from hgad.data import list_image_files
from hgad.errors import ConfigError, InputError
from hgad.inference import Detector, Prediction
from hgad.io import atomic_write_bytes, atomic_write_text
from hgad.report import overlay

__all__ = ["predict_paths", "map_png16", "SCORES_FILE"]

SCORES_FILE = "scores.csv"


def map_png16(amap: np.ndarray, full_scale: float) -> bytes:
    """16-bit grey PNG of a map: pixel value v means score v / 65535 * full_scale."""
    q = np.clip(amap / full_scale, 0, 1) * 65535 if full_scale > 0 else np.zeros_like(amap)
    buf = io.BytesIO()
    Image.fromarray(np.round(q).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _files(paths: list[Path]) -> list[Path]:
    """Folders are searched for images; files named explicitly are kept whatever their extension,
    so that a bad one is reported in scores.csv rather than silently skipped."""
    out: list[Path] = []
    for p in paths:
        if p.is_file():
            out.append(p)
        else:
            out.extend(list_image_files([p]))
    return out


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(path, f"cannot read image: {str(err).splitlines()[0][:100]}") from None


def _write_outputs(out: Path, stem: str, image: Image.Image, pred: Prediction, map_format: str,
                   full_scale: float) -> str:
    if map_format == "npy":
        buf = io.BytesIO()
        np.save(buf, pred.anomaly_map.astype(np.float32))
        atomic_write_bytes(out / "maps" / f"{stem}.npy", buf.getvalue())
        map_name = f"maps/{stem}.npy"
    else:
        atomic_write_bytes(out / "maps" / f"{stem}.png", map_png16(pred.anomaly_map, full_scale))
        map_name = f"maps/{stem}.png"
    buf = io.BytesIO()
    overlay(image, pred.anomaly_map, full_scale).save(buf, format="PNG")
    atomic_write_bytes(out / "overlays" / f"{stem}.png", buf.getvalue())
    return map_name


def predict_paths(run_dir: Path, paths: list[Path], out: Path, *, threshold: float | None = None,
                  class_name: str | None = None, map_format: str = "png16", batch_size: int = 8,
                  device: str = "auto", progress: bool = True, onnx: Path | None = None) -> str:
    """Score every image under ``paths``; write maps, overlays and scores.csv to ``out``.

    With ``onnx`` (a file written by ``hgad export`` from ``run_dir``) the images go through onnxruntime.
    """
    files = _files(paths)  # missing paths fail before the model is loaded
    if not files:
        raise InputError(paths[0], "no image files found")
    if onnx is not None:
        from hgad.export import OnnxDetector

        detector: Detector | OnnxDetector = OnnxDetector.load(onnx, device, run_dir=run_dir)
    else:
        detector = Detector.load(run_dir, device)
    if class_name is not None and class_name not in detector.class_names:  # before anything is written
        raise ConfigError("--class", f"unknown class {class_name!r}; known: {', '.join(detector.class_names)}")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    stems: dict[str, int] = {}
    n_bad = n_anomalous = 0
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images: list[tuple[Path, Image.Image]] = []
        for f in chunk:
            try:
                images.append((f, _open(f)))
            except InputError as err:
                n_bad += 1
                rows.append({"path": str(f), "class": "", "score": "", "threshold": "", "is_anomalous": "",
                             "map": "", "error": err.problem})
        preds = detector.predict([im for _, im in images], class_name=class_name, threshold=threshold) \
            if images else []
        for (f, im), pred in zip(images, preds):
            stem = f.stem if f.stem not in stems else f"{f.stem}_{stems[f.stem]}"
            stems[f.stem] = stems.get(f.stem, 0) + 1
            full_scale = 2 * pred.threshold if np.isfinite(pred.threshold) and pred.threshold > 0 \
                else float(pred.anomaly_map.max()) or 1.0
            map_name = _write_outputs(out, stem, im, pred, map_format, full_scale)
            n_anomalous += pred.is_anomalous
            rows.append({"path": str(f), "class": pred.class_name, "score": f"{pred.score:.6g}",
                         "threshold": f"{pred.threshold:.6g}", "is_anomalous": str(int(pred.is_anomalous)),
                         "map": map_name, "png16_full_scale": f"{full_scale:.6g}", "error": ""})
        bar.update(len(chunk))
    bar.close()
    buf = io.StringIO()
    fields = ["path", "class", "score", "threshold", "is_anomalous", "map", "png16_full_scale", "error"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / SCORES_FILE, buf.getvalue())
    scored = len(files) - n_bad
    return (f"scored {scored} of {len(files)} images ({n_anomalous} anomalous, {n_bad} unreadable); "
            f"results in {out / SCORES_FILE}")
