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

from hgad.checkpoint import load_model
from hgad.data import preprocess
from hgad.device import resolve_device
from hgad.errors import ConfigError
from hgad.model import HGAD
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


class Detector:
    """A trained model plus its preprocessing: scores PIL images, tensors or files, one by one or batched."""

    def __init__(self, model: HGAD, source: str = "model") -> None:
        self.model = model.eval()
        self.source = source  # named in errors about the model (its run folder when loaded from one)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", **overrides) -> Detector:
        """The trained model of a run folder (``overrides``: e.g. ``backbone_weights`` of a moved file)."""
        return cls(load_model(Path(run_dir), resolve_device(device), **overrides), str(Path(run_dir)))

    @classmethod
    def fit(cls, data: Sequence[str], out: str | Path, *, preset: str = "fast", classes: Sequence[str] | None = None,
            resume: bool = False, progress: bool = True, **overrides) -> Detector:
        """Train on the normal images of ``data`` (``["mvtec:/path", ...]``); same as ``hgad train``."""
        from hgad.config import preset as make_config
        from hgad.data import data_record, discover
        from hgad.training import fit

        cfg = make_config(preset, **overrides)
        catalog = discover(list(data), classes, need_test=False)
        model = HGAD(cfg, catalog.classes).to(resolve_device(cfg.device))
        fit(model, catalog.train, Path(out), resume=resume, progress=progress, log=lambda *_: None,
            extra_config={"data": data_record(list(data))})
        return cls(model.eval())

    def save(self, run_dir: str | Path) -> None:
        """Write config.json and model.safetensors (atomically) to ``run_dir``."""
        from hgad.checkpoint import save_model, save_run_config

        save_run_config(Path(run_dir), self.model)
        save_model(Path(run_dir), self.model)

    def evaluate(self, data: Sequence[str], *, protocol: str = "deploy", class_source: str = "inferred",
                 classes: Sequence[str] | None = None, progress: bool = False) -> EvalResult:
        """Metrics on the test split of ``data``; same as ``hgad test``."""
        from hgad.data import discover
        from hgad.evaluation import evaluate

        catalog = discover(list(data), classes, need_train=False)
        return evaluate(self.model, catalog, protocol=protocol, class_source=class_source, progress=progress)

    @property
    def class_names(self) -> list[str]:
        """Names of the classes the model knows, in index order."""
        return self.model.class_names

    def preprocess(self, image: Image.Image | Tensor) -> Tensor:
        """A PIL image as the model's (3, S, S) input; a tensor is taken as already preprocessed."""
        if isinstance(image, Image.Image):
            return preprocess(image, self.model.cfg.img_size, self.model.input_norm)
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
        scored = model.score(model.extract(batch), score=model.score_kind(), norm=model.deploy_norm(), classes=classes)
        return to_predictions(scored.maps.cpu().numpy(), scored.scores.tolist(), scored.classes.tolist(),
                              scored.confidence.tolist(), model.class_names, model.threshold.tolist(), threshold,
                              self.source)


def check_threshold_arg(threshold: float | None) -> None:
    """A threshold given by the caller must be a finite number (checked before any image is scored)."""
    if threshold is not None and not np.isfinite(threshold):
        raise ConfigError("--threshold", f"must be a finite number, got {threshold}")


def to_predictions(maps: np.ndarray, scores: Sequence[float], classes: Sequence[int], confidences: Sequence[float],
                   class_names: Sequence[str], thresholds: Sequence[float], threshold: float | None,
                   source: str) -> list[Prediction]:
    """One :class:`Prediction` per image of a scored batch (from PyTorch or the ONNX graph): the threshold
    is ``threshold`` or the scoring class's stored one; non-finite maps or thresholds stop with one line."""
    check_finite_maps(maps, source)
    out = []
    for i, c in enumerate(int(c) for c in classes):
        thr = float(thresholds[c]) if threshold is None else threshold
        check_threshold(thr, class_names[c], source)
        score = float(scores[i])
        out.append(Prediction(score=score, anomaly_map=maps[i], class_index=c, class_name=class_names[c],
                              class_confidence=float(confidences[i]), threshold=thr, is_anomalous=score > thr))
    return out
