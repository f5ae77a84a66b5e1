"""The Python API: :class:`Detector` (train, load, score images) and :class:`Prediction` (one image's result).

``Detector`` is a thin front: training is :func:`hgad.training.fit`, dataset-level evaluation is
:func:`hgad.evaluation.evaluate`; what it adds is preprocessing and turning scored batches into
:class:`Prediction` objects with the decision threshold applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from hgad.calibration import Calibration, image_logp, load_calibration
from hgad.checkpoint import load_model
from hgad.data import preprocess
from hgad.device import resolve_device
from hgad.errors import ConfigError
from hgad.geometry import content_box
from hgad.model import HGAD, LatentMaps
from hgad.scoring import check_finite_maps, check_threshold

if TYPE_CHECKING:
    from hgad.evaluation import EvalResult

__all__ = ["Prediction", "Detector", "to_predictions", "check_threshold_arg"]


@dataclass
class Prediction:
    """The result for one image."""

    score: float  # image anomaly score (max of the map)
    anomaly_map: np.ndarray  # (M, M) float32 pixel scores
    class_index: int  # class whose model scored the image
    class_name: str
    class_confidence: float  # image-mean posterior of that class (nan for a single-Gaussian prior)
    threshold: float
    is_anomalous: bool
    path: str | None = None
    is_unknown: bool = False  # out of every class's distribution (calibration images): never "normal"
    image_size: tuple[int, int] | None = None  # (width, height) of a PIL image given (geometry.map_to_original)

    @property
    def decision(self) -> str:
        """``unknown``, ``anomalous`` or ``normal``."""
        return "unknown" if self.is_unknown else "anomalous" if self.is_anomalous else "normal"


class Detector:
    """A trained model plus its preprocessing: scores PIL images, tensors or files, one by one or batched."""

    def __init__(self, model: HGAD, source: str = "model", calibration: Calibration | None = None) -> None:
        self.model = model.eval()
        self.source = source  # named in errors about the model (its run folder when loaded from one)
        self.calibration = calibration  # unknown-input limits and training aspect ratios (None: older runs)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", **overrides) -> Detector:
        """The trained model of a run folder (``overrides``: e.g. ``backbone_weights`` of a moved file)."""
        return cls(load_model(Path(run_dir), resolve_device(device), **overrides), str(Path(run_dir)),
                   load_calibration(Path(run_dir)))

    @classmethod
    def fit(cls, data: Sequence[str], out: str | Path, *, preset: str = "fast", classes: Sequence[str] | None = None,
            resume: bool = False, progress: bool = True, **overrides) -> Detector:
        """Train on the normal images of ``data`` (``["mvtec:/path", ...]``); same as ``hgad train``."""
        from hgad.calibration import train_calibrated
        from hgad.config import preset as make_config
        from hgad.data import data_record, discover

        cfg = make_config(preset, **overrides)
        catalog = discover(list(data), classes, need_test=False)
        model = HGAD(cfg, catalog.classes).to(resolve_device(cfg.device))
        train_calibrated(model, catalog.train, Path(out), resume=resume, progress=progress, log=lambda *_: None,
                         extra_config={"data": data_record(list(data))})
        return cls(model.eval(), str(out), load_calibration(Path(out)))

    def save(self, run_dir: str | Path) -> None:
        """Write config.json and model.safetensors (atomically) to ``run_dir``."""
        from hgad.checkpoint import save_model, save_run_config

        save_run_config(Path(run_dir), self.model)
        save_model(Path(run_dir), self.model)

    def evaluate(self, data: Sequence[str], *, protocol: str = "deploy", class_source: str = "inferred",
                 classes: Sequence[str] | None = None, score: str | None = None, score_scales: int | None = None,
                 progress: bool = False) -> EvalResult:
        """Metrics on the test split of ``data``; same as ``hgad test`` (``score``, ``score_scales``: its
        re-scoring options)."""
        from hgad.data import discover
        from hgad.evaluation import evaluate

        catalog = discover(list(data), classes, need_train=False)
        return evaluate(self.model, catalog, protocol=protocol, class_source=class_source, progress=progress,
                        score=score, score_scales=score_scales)

    @property
    def class_names(self) -> list[str]:
        """Names of the classes the model knows, in index order."""
        return self.model.class_names

    @property
    def resize(self) -> str:
        """How images are made square (:mod:`hgad.geometry`); maps go back to the image with it."""
        return self.model.cfg.resize

    def preprocess(self, image: Image.Image | Tensor) -> Tensor:
        """A PIL image as the model's (3, S, S) input; a tensor is taken as already preprocessed."""
        if isinstance(image, Image.Image):
            return preprocess(image, self.model.cfg.img_size, self.model.input_norm, self.resize)
        if image.dim() != 3 or image.shape[0] != 3:
            raise ConfigError("image", f"expected a preprocessed (3, H, W) tensor, got {tuple(image.shape)}")
        return image

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image | Tensor] | Image.Image | Tensor, *,
                class_name: str | None = None, threshold: float | None = None) -> list[Prediction]:
        """Score images with the deploy protocol. ``class_name`` fixes the class (else inferred)."""
        if isinstance(images, Image.Image | Tensor) and not (isinstance(images, Tensor) and images.dim() == 4):
            images = [images]
        batch = torch.stack([self.preprocess(im) for im in images])
        model = self.model
        if not bool(model.calibrated):
            raise ConfigError("model", "has no deploy statistics (training did not finish calibration)")
        classes = None
        if class_name is not None:
            if class_name not in model.class_names:
                raise ConfigError("--class", f"unknown class {class_name!r}; known: {', '.join(model.class_names)}")
            classes = torch.full((len(batch),), model.class_names.index(class_name))
        check_threshold_arg(threshold)
        lm = model.latent_maps(model.extract(batch), classes, knn=model.reads_knn())
        scored = model.score_latent(lm, score=model.score_kind(), norm=model.deploy_norm())
        sizes = [im.size if isinstance(im, Image.Image) else None for im in images]
        return to_predictions(scored.maps.cpu().numpy(), scored.scores.tolist(), scored.classes.tolist(),
                              scored.confidence.tolist(), model.class_names, model.threshold.tolist(), threshold,
                              self.source, unknown=self._unknown(lm, scored.classes.tolist(), sizes), sizes=sizes)

    def _unknown(self, lm: LatentMaps, classes: list[int], sizes: list[tuple[int, int] | None]) -> list[bool]:
        """Per image: out of its scoring class's distribution (:meth:`hgad.calibration.Calibration.is_unknown`,
        over the image's own cells); never for runs without a calibration record."""
        if self.calibration is None:
            return [False] * len(classes)
        full = (0.0, 0.0, 1.0, 1.0)  # a preprocessed tensor: where the image lies is unknown
        logp = image_logp(lm, [content_box(*s, self.resize) if s else full for s in sizes]).tolist()
        names = self.model.class_names
        return [self.calibration.is_unknown(names[c], v) for c, v in zip(classes, logp)]


def check_threshold_arg(threshold: float | None) -> None:
    """A threshold given by the caller must be a finite number (checked before any image is scored)."""
    if threshold is not None and not np.isfinite(threshold):
        raise ConfigError("--threshold", f"must be a finite number, got {threshold}")


def to_predictions(maps: np.ndarray, scores: Sequence[float], classes: Sequence[int], confidences: Sequence[float],
                   class_names: Sequence[str], thresholds: Sequence[float], threshold: float | None,
                   source: str, *, unknown: Sequence[bool] | None = None,
                   sizes: Sequence[tuple[int, int] | None] | None = None) -> list[Prediction]:
    """One :class:`Prediction` per image of a scored batch (from PyTorch or the ONNX graph).

    The threshold is ``threshold`` or the scoring class's stored one; non-finite maps or thresholds stop
    with one line. ``unknown`` and ``sizes`` (PIL images' (width, height)) are per image, if known.
    """
    check_finite_maps(maps, source)
    out = []
    for i, c in enumerate(int(c) for c in classes):
        thr = float(thresholds[c]) if threshold is None else threshold
        check_threshold(thr, class_names[c], source)
        score = float(scores[i])
        out.append(Prediction(score=score, anomaly_map=maps[i], class_index=c, class_name=class_names[c],
                              class_confidence=float(confidences[i]), threshold=thr, is_anomalous=score > thr,
                              is_unknown=bool(unknown[i]) if unknown is not None else False,
                              image_size=sizes[i] if sizes is not None else None))
    return out
