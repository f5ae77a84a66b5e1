"""Decisions calibrated on normal images the flow never trained on: thresholds and unknown-input limits.

At train time a fraction of each class's training images (``--calibration-split``) is held out from
the flow. After training they are scored like any deployed image; each class's threshold is chosen
for ``--target-fpr`` on their scores (:func:`hgad.thresholds.threshold_for_fpr`): scores of the
flow's own training images are optimistic, so a quantile of them lets through more false alarms and
catches fewer defects than it promises. Their class confidence and log-likelihood are the yardstick
for inputs that belong to no class (``unknown``). Everything is kept in ``RUN_DIR/calibration.json``;
the thresholds themselves live in ``model.safetensors`` (ONNX export and every command read them there).

``hgad threshold RUN`` (:func:`set_thresholds`) changes a class's threshold after training, by value or
for another target rate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hgad import distributed
from hgad.checkpoint import MODEL_FILE, read_run_config, read_tensors, rewrite_model_tensors, save_model
from hgad.data import ImageDataset, ImageRecord, open_image
from hgad.data.images import header_size
from hgad.errors import ConfigError, InputError
from hgad.geometry import content_box
from hgad.io import atomic_write_json
from hgad.model import HGAD, LatentMaps
from hgad.scoring import check_finite_maps
from hgad.thresholds import lower_limit, threshold_for_fpr
from hgad.training import fit

__all__ = ["CALIBRATION_FILE", "UNKNOWN_MARGIN", "ClassCalibration", "Calibration", "split_calibration",
           "image_logp", "score_records", "calibrate", "train_calibrated", "load_calibration", "save_calibration",
           "set_thresholds"]

CALIBRATION_FILE = "calibration.json"
# an image is unknown when its log-likelihood is below the calibration images' lowest by more than this many
# times the gap between their lowest and median values. Measured on the demo data (256 px, 8 calibration
# images per class): normal test images needed up to 1.4, defective ones up to 7.9, pure noise 15, a black
# frame 50, a grey one 160. The class confidence does not separate them (defects drop it as far as noise
# does), so it is reported but not used.
UNKNOWN_MARGIN = 10.0


@dataclass
class ClassCalibration:
    """What the held-out normal images of one class showed, and where its threshold came from."""

    images: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # deploy image scores
    confidence: list[float] = field(default_factory=list)  # own class's image-mean posterior (nan: none)
    logp: list[float] = field(default_factory=list)  # image log-likelihood (:func:`image_logp`)
    quantile_threshold: float | None = None  # the --threshold-quantile of the training images' scores
    threshold_source: str = "training quantile"  # or "calibration (target FPR x)", "set by hand"


@dataclass
class Calibration:
    """``calibration.json`` of a run."""

    target_fpr: float
    classes: dict[str, ClassCalibration]
    train_aspect: tuple[float, float] | None = None  # (min, max) width / height of the training images

    def is_unknown(self, class_name: str, logp: float) -> bool:
        """Whether an image is out of the scoring class's distribution.

        Its log-likelihood (:func:`image_logp`) lies far below the class's calibration images'. Classes
        without calibration images never flag.
        """
        cal = self.classes.get(class_name)
        if cal is None or not cal.logp:
            return False
        return not math.isfinite(logp) or logp < lower_limit(cal.logp, UNKNOWN_MARGIN)

    def to_json(self) -> dict[str, Any]:
        """The record as ``calibration.json`` holds it."""
        return {"target_fpr": self.target_fpr, "train_aspect": list(self.train_aspect) if self.train_aspect else None,
                "classes": {name: asdict(c) for name, c in self.classes.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        """The record read back from :meth:`to_json`'s form."""
        aspect = data.get("train_aspect")
        return cls(target_fpr=float(data["target_fpr"]),
                   classes={name: ClassCalibration(**c) for name, c in data["classes"].items()},
                   train_aspect=(float(aspect[0]), float(aspect[1])) if aspect else None)


def split_calibration(records: Sequence[ImageRecord], fraction: float, seed: int
                      ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training, calibration) records: ``round(fraction * n)`` images of each class held out.

    At least one when ``fraction > 0``, never all of them; which ones is a pure function of ``seed``
    (``--resume`` agrees).
    """
    if fraction <= 0:
        return list(records), []
    by_class: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_class.setdefault(r.class_index, []).append(i)
    held: set[int] = set()
    for c, idx in by_class.items():
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed * 7919 + c))
        held.update(idx[int(j)] for j in order[:k])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def image_logp(lm: LatentMaps, boxes: Sequence[tuple[float, float, float, float]] | None = None) -> Tensor:
    """(B,) median over positions of the per-dimension log-likelihood, averaged over scales.

    The median moves when the whole image is foreign, hardly for a local defect (that is the anomaly
    map's job). The one place that turns latent maps into an image log-likelihood.

    ``boxes`` (:func:`hgad.geometry.content_box`, one per image) keeps the positions wholly inside the
    image: ``pad`` borders look alike in every image and would hold the median still.
    """
    levels = []
    for m in lm.logp:
        h, w = m.shape[1:]
        per_image = []
        for i in range(m.shape[0]):
            x0, y0, x1, y1 = boxes[i] if boxes is not None else (0.0, 0.0, 1.0, 1.0)
            rows, cols = _inner(y0, y1, h), _inner(x0, x1, w)
            per_image.append(m[i, rows, cols].float().median())
        levels.append(torch.stack(per_image))
    return torch.stack(levels).mean(0)


def _inner(lo: float, hi: float, n: int) -> slice:
    """Cells of ``n`` lying wholly in [lo, hi] (as fractions); the nearest one when none does."""
    start, stop = math.ceil(lo * n - 1e-6), math.floor(hi * n + 1e-6)
    return slice(start, stop) if stop > start else slice(min(int(lo * n), n - 1), min(int(lo * n), n - 1) + 1)


@torch.no_grad()
def score_records(model: HGAD, records: Sequence[ImageRecord], batch_size: int = 8) -> dict[str, np.ndarray]:
    """Deploy scores, class confidence and image log-likelihood of ``records``, each under its own class.

    The maps are the deploy path's (:meth:`hgad.model.HGAD.score_latent` with the run's own score and
    stored normalisation), so the thresholds chosen on them apply to what ``predict`` and ``test`` compute.
    """
    cfg = model.cfg
    loader = torch.utils.data.DataLoader(
        ImageDataset(records, cfg.img_size, cfg.map_size, model.input_norm, cfg.resize), batch_size=batch_size)
    kind, norm = model.score_kind(), model.deploy_norm()
    out: dict[str, list[np.ndarray]] = {"scores": [], "confidence": [], "logp": []}
    for batch in loader:
        lm = model.latent_maps(model.extract(batch.image), batch.class_index, knn=model.reads_knn(kind))
        scored = model.score_latent(lm, score=kind, norm=norm)
        boxes = [content_box(*header_size(records[int(i)].path), cfg.resize) for i in batch.index]
        out["scores"].append(scored.scores.cpu().numpy())
        out["confidence"].append(scored.confidence.cpu().numpy())
        out["logp"].append(image_logp(lm, boxes).cpu().numpy())
    return {k: np.concatenate(v).astype(np.float64) if v else np.empty(0) for k, v in out.items()}


def _train_aspect(records: Sequence[ImageRecord]) -> tuple[float, float] | None:
    """(min, max) width / height of ``records`` (file headers only)."""
    ratios = [w / h for w, h in (header_size(r.path) for r in records)]
    return (min(ratios), max(ratios)) if ratios else None


def calibrate(model: HGAD, calibration: Sequence[ImageRecord], train: Sequence[ImageRecord],
              target_fpr: float) -> Calibration:
    """Score the held-out images, set each class's threshold for ``target_fpr`` (classes without
    held-out images keep the training-quantile threshold) and return the record to store."""
    values = score_records(model, calibration)
    check_finite_maps(values["scores"], "model", "the calibration images")
    classes: dict[str, ClassCalibration] = {}
    for c, name in enumerate(model.class_names):
        sel = [i for i, r in enumerate(calibration) if r.class_index == c]
        cal = ClassCalibration(quantile_threshold=float(model.threshold[c]))
        if sel:
            cal.images = [str(calibration[i].path) for i in sel]
            cal.scores, cal.confidence, cal.logp = ([float(values[k][i]) for i in sel]
                                                    for k in ("scores", "confidence", "logp"))
            model.threshold[c] = threshold_for_fpr(cal.scores, target_fpr)
            cal.threshold_source = f"calibration (target FPR {target_fpr:g})"
        classes[name] = cal
    return Calibration(target_fpr=target_fpr, classes=classes, train_aspect=_train_aspect(train))


def train_calibrated(model: HGAD, records: Sequence[ImageRecord], run_dir: Path, *, resume: bool = False,
                     progress: bool = True, extra_config: dict | None = None, log: Callable[..., None] = print):
    """:func:`hgad.training.fit` on all but the held-out images, then :func:`calibrate` on those.

    Writes ``model.safetensors`` (with the thresholds) and ``calibration.json``. Returns fit's result.
    """
    cfg = model.cfg
    train, held = split_calibration(records, cfg.calibration_split, cfg.seed)
    if held:
        if len(train) < cfg.batch_size <= len(records):
            raise ConfigError("--batch-size", f"{cfg.batch_size} is larger than the {len(train)} training images "
                              f"left after --calibration-split {cfg.calibration_split:g} held out {len(held)} of "
                              f"{len(records)} (lower either)")
        for r in held:  # a bad file must stop the run before training, not after it
            open_image(r.path)
        log(f"{len(held)} of the {len(records)} training images held out to calibrate the thresholds "
            f"(--calibration-split {cfg.calibration_split:g}); the flow trains on {len(train)}")
    fewest = min((sum(r.class_index == c for r in held) for c in range(model.n_classes)), default=0)
    if held and 1 / (fewest + 1) > cfg.target_fpr:
        log(f"note: with {fewest} calibration images a class's threshold is their highest score, whose expected "
            f"false-positive rate is about 1/{fewest + 1} = {1 / (fewest + 1):.0%}, above --target-fpr "
            f"{cfg.target_fpr:g} (about {math.ceil(1 / cfg.target_fpr) - 1} images per class reach it)")
    result = fit(model, train, run_dir, resume=resume, progress=progress, extra_config=extra_config, log=log)
    cal = calibrate(model, held, train, cfg.target_fpr)
    ctx = distributed.context()
    if ctx is None or ctx.is_main:
        save_model(Path(run_dir), model)
        save_calibration(Path(run_dir), cal)
    if ctx is not None:
        ctx.barrier()
    return result


def save_calibration(run_dir: Path, cal: Calibration) -> None:
    """Write ``calibration.json`` atomically."""
    atomic_write_json(Path(run_dir) / CALIBRATION_FILE, cal.to_json())


def load_calibration(run_dir: Path) -> Calibration | None:
    """The run's calibration record; None for runs trained before it existed (they decide as they did)."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        return Calibration.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise InputError(path, f"not a hgad calibration record ({type(err).__name__}: {err})") from None


def set_thresholds(run_dir: Path, classes: Sequence[str] | None, *, value: float | None = None,
                   target_fpr: float | None = None) -> dict[str, tuple[float, float]]:
    """Set the stored threshold of ``classes`` (None: all) to ``value``, or recompute it for ``target_fpr``.

    ``target_fpr`` uses the stored calibration scores. Returns class -> (old, new). Both files are
    replaced atomically.
    """
    run_dir = Path(run_dir)
    names = list(read_run_config(run_dir)["class_names"])
    wanted = list(classes) if classes else names
    for name in wanted:
        if name not in names:
            raise ConfigError("--class", f"unknown class {name!r}; known: {', '.join(names)}")
    if (value is None) == (target_fpr is None):
        raise ConfigError("--value/--target-fpr", "give exactly one of them")
    if value is not None and not math.isfinite(value):
        raise ConfigError("--value", f"must be a finite number, got {value}")
    if target_fpr is not None and not 0 < target_fpr < 1:
        raise ConfigError("--target-fpr", f"must be in (0, 1), got {target_fpr}")
    cal = load_calibration(run_dir)
    if target_fpr is not None:
        missing = [n for n in wanted if cal is None or n not in cal.classes or not cal.classes[n].scores]
        if missing:
            raise InputError(run_dir / CALIBRATION_FILE, f"no calibration scores stored for {', '.join(missing)} "
                             "(trained before hgad kept them, or with --calibration-split 0); give --value")
    tensors, _ = read_tensors(run_dir / MODEL_FILE)
    thr = tensors["threshold"].clone()
    changed = {}
    for name in wanted:
        c = names.index(name)
        new = value if value is not None else threshold_for_fpr(cal.classes[name].scores, target_fpr)
        changed[name] = (float(thr[c]), float(new))
        thr[c] = new
        if cal is not None and name in cal.classes:
            cal.classes[name].threshold_source = "set by hand" if value is not None \
                else f"calibration (target FPR {target_fpr:g})"
    rewrite_model_tensors(run_dir, {**tensors, "threshold": thr})
    if cal is not None:
        save_calibration(run_dir, cal)
    return changed

