"""``hgad export``: the whole deploy-protocol inference path as one ONNX graph, and a detector that runs it.

A deployment target often has onnxruntime but no torch/timm stack, so the exported graph goes from a
preprocessed image batch straight to the anomaly map, image score, inferred class and its confidence,
with the normalisation statistics stored at training baked in; only the batch size is dynamic. The
model's own code is traced (no second implementation to drift), and the export is checked against
PyTorch on a random batch before the file is written. ``onnx`` and ``onnxruntime`` are optional
(``pip install 'hgad[onnx]'``) and imported only here, only when needed.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from hgad.api import Prediction, check_threshold_arg, to_predictions
from hgad.data import IMAGENET_NORM, Norm, preprocess
from hgad.errors import ConfigError, InputError, brief
from hgad.model import HGAD
from hgad.onnx_spec import DEFAULT_OPSET, INPUT_NAME, MAX_OPSET, META_KEY, MIN_OPSET, OUTPUT_NAMES
from hgad.version import __version__

__all__ = ["INPUT_NAME", "OUTPUT_NAMES", "DEFAULT_OPSET", "InferenceGraph", "ExportCheck", "export_onnx",
           "OnnxDetector"]

_CHECK_TOLERANCE = 1e-3  # relative to max(1, |output|): more disagreement with PyTorch is a bug, never written
_PREPROCESSING = ("RGB; made img_size x img_size (Lanczos) as the resize entry says (squash: whole image; pad: "
                  "longer side to img_size, borders the input_mean colour; crop: shorter side then centre crop); /255; "
                  "minus input_mean, divided by input_std (per channel); NCHW float32")


def _require(module: str, option: str) -> ModuleType:
    """Import an optional dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(option, f"needs the optional package '{module}': "
                                  "pip install 'hgad[onnx]'") from None


class InferenceGraph(nn.Module):
    """``images (B,3,S,S)`` -> ``maps (B,M,M)``, ``scores (B,)``, ``classes (B,)``, ``confidences (B,)``.

    Exactly what :meth:`hgad.api.Detector.predict` computes with the class inferred: latent maps
    under the class of highest image-mean posterior, normalised by the stored deploy statistics.
    The confidence is that class's posterior (NaN for a single-Gaussian prior); classes are int64.
    """

    def __init__(self, model: HGAD) -> None:
        super().__init__()
        self.model = model.eval()
        self.score = model.score_kind()  # the run's pixel score, fixed in the graph

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The deploy path of :meth:`hgad.model.HGAD.score`, flattened into the graph's four outputs."""
        model = self.model
        scored = model.score(model.extract(images), score=self.score, norm=model.deploy_norm())
        return scored.maps, scored.scores, scored.classes, scored.confidence


@dataclass
class ExportCheck:
    """Agreement of onnxruntime with PyTorch on the random batch the export was checked with."""

    max_diff: float  # over maps, scores, confidences of images whose class agrees; relative to max(1, |output|)
    classes_agree: int
    n_images: int
    n_nodes: int


def _metadata(model: HGAD) -> dict[str, str]:
    thresholds = [float(t) if math.isfinite(float(t)) else None for t in model.threshold.tolist()]
    return {
        META_KEY: __version__,
        "class_names": json.dumps(model.class_names),
        "thresholds": json.dumps(thresholds),  # null: no threshold (never anomalous)
        "img_size": str(model.cfg.img_size),
        "resize": model.cfg.resize,
        "map_size": str(model.cfg.map_size),
        "score": model.cfg.score,
        "preprocessing": _PREPROCESSING,
        "input_norm": json.dumps(model.input_norm),
        "outputs": "anomaly_map (B,M,M) float32; score (B,) float32 = max of the map; "
                   "class_index (B,) int64; class_confidence (B,) float32 = image-mean posterior of "
                   "that class",
        "config": model.cfg.to_json(),
    }


def _trace(graph: InferenceGraph, example: Tensor, opset: int) -> bytes:
    buf = io.BytesIO()
    names = [INPUT_NAME, *OUTPUT_NAMES]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the result is checked below
        torch.onnx.export(graph, (example,), buf, dynamo=False, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), opset_version=opset, do_constant_folding=True,
                          dynamic_axes={name: {0: "batch"} for name in names})
    return buf.getvalue()


def _session(ort: ModuleType, model: bytes | str, providers: Sequence[str]) -> Any:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, sess_options=opts, providers=list(providers))


def _compare(torch_out: Sequence[Tensor], ort_out: Sequence[np.ndarray]) -> tuple[float, int]:
    """Largest difference of the float outputs over images of agreeing class, relative to the output's
    magnitude (at least 1: z-score maps of the random check batch reach thousands), and their count."""
    agree = torch_out[2].cpu().numpy() == ort_out[2]
    diff = 0.0
    for i in (0, 1, 3):
        ref, got = torch_out[i].cpu().numpy()[agree], ort_out[i][agree]
        if ref.size and not np.isnan(ref).all():
            scale = max(1.0, float(np.nanmax(np.abs(ref))))
            diff = max(diff, float(np.nanmax(np.abs(ref - got))) / scale)
    return diff, int(agree.sum())


def export_onnx(model: HGAD, out: str | Path, *, opset: int = DEFAULT_OPSET, seed: int = 0) -> ExportCheck:
    """Write ``model``'s inference path to ``out`` (atomically) after checking it with onnxruntime.

    The model is moved to the CPU and traced in float32 (no autocast). The check runs a random batch
    of 2 through both PyTorch and onnxruntime; a disagreement beyond 1e-3 means an exporter bug and
    raises RuntimeError.
    """
    onnx = _require("onnx", "--format onnx")
    ort = _require("onnxruntime", "--format onnx")
    from hgad.io import atomic_write_bytes

    if not bool(model.calibrated):
        raise ConfigError("model", "has no deploy statistics (training did not finish calibration); "
                                   "nothing to export")
    max_opset = min(MAX_OPSET, int(onnx.defs.onnx_opset_version()))
    if not MIN_OPSET <= opset <= max_opset:
        raise ConfigError("--opset", f"must be in {MIN_OPSET}..{max_opset}, got {opset}")
    model = model.to("cpu").eval()
    graph = InferenceGraph(model)
    size = model.cfg.img_size
    gen = torch.Generator().manual_seed(seed)
    try:
        data = _trace(graph, torch.randn(1, 3, size, size, generator=gen), opset)
    except torch.onnx.errors.UnsupportedOperatorError as err:
        problem = brief(err, 300)
        raise ConfigError("--opset", f"{opset} cannot express the model: {problem}") from None
    proto = onnx.load_from_string(data)
    for key, value in _metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (f"hgad {__version__} deploy-protocol inference: "
                        f"{INPUT_NAME} -> {', '.join(OUTPUT_NAMES)}")
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    batch = torch.randn(2, 3, size, size, generator=gen)
    with torch.no_grad():
        ref = graph(batch)
    from hgad.scoring import check_finite_maps, check_threshold

    check_finite_maps(ref[0], "model", "a random batch; nothing exported")
    for name, thr in zip(model.class_names, model.threshold.tolist()):
        check_threshold(thr, name, "model")
    got = _session(ort, data, ["CPUExecutionProvider"]).run(None, {INPUT_NAME: batch.numpy()})
    diff, agree = _compare(ref, got)
    check = ExportCheck(max_diff=diff, classes_agree=agree, n_images=len(batch),
                        n_nodes=len(proto.graph.node))
    if agree < len(batch) or not diff <= _CHECK_TOLERANCE:
        raise RuntimeError(f"ONNX export disagrees with PyTorch ({agree}/{len(batch)} classes agree, "
                           f"max relative diff {diff:.3g}); {out} not written")
    atomic_write_bytes(out, data)
    return check


def _providers(ort: ModuleType, device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigError("--device", "cuda: this onnxruntime has no CUDA provider "
                                          "(install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxDetector:
    """An exported graph run with onnxruntime; same ``predict`` as :class:`hgad.api.Detector`."""

    def __init__(self, session: Any, class_names: list[str], thresholds: list[float], img_size: int,
                 map_size: int, source: str = "model", norm: Norm = IMAGENET_NORM, resize: str = "crop") -> None:
        self.session = session
        self.source = source
        self._class_names = class_names
        self.thresholds = thresholds
        self.img_size = img_size
        self.map_size = map_size
        self.norm = norm
        self.resize = resize

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", *,
             run_dir: str | Path | None = None) -> OnnxDetector:
        """Open a file written by ``hgad export``; with ``run_dir``, check it was exported from that run."""
        ort = _require("onnxruntime", "--onnx")
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "ONNX model not found")
        try:
            session = _session(ort, str(path), _providers(ort, device))
        except ConfigError:
            raise
        except Exception as err:  # onnxruntime reports bad files with several exception types
            raise InputError(path, f"not a readable ONNX model ({brief(err)})") from None
        meta = session.get_modelmeta().custom_metadata_map
        try:
            if META_KEY not in meta:
                raise KeyError(META_KEY)
            names = list(json.loads(meta["class_names"]))
            thresholds = [math.inf if t is None else float(t) for t in json.loads(meta["thresholds"])]
            img_size, map_size = int(meta["img_size"]), int(meta["map_size"])
            mean, std = json.loads(meta["input_norm"]) if "input_norm" in meta else IMAGENET_NORM  # older exports
            norm = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
            resize = meta.get("resize", "crop")  # exports before --resize cropped
        except (KeyError, ValueError, TypeError) as err:
            raise InputError(path, f"not an ONNX model written by 'hgad export' (metadata: {err})") from None
        if run_dir is not None:
            from hgad.checkpoint import read_run_config

            saved = read_run_config(Path(run_dir))
            if list(saved["class_names"]) != names or int(saved["config"].get("img_size", -1)) != img_size:
                raise ConfigError("--onnx", f"{path} was not exported from {run_dir} (classes or image size "
                                            "differ)")
        return cls(session, names, thresholds, img_size, map_size, str(path), norm, resize)

    @property
    def class_names(self) -> list[str]:
        """Names of the classes stored in the graph's metadata, in index order."""
        return self._class_names

    def preprocess(self, image: Image.Image | Tensor) -> Tensor:
        """A PIL image as the graph's (3, S, S) input; a tensor must already have that shape."""
        if isinstance(image, Image.Image):
            return preprocess(image, self.img_size, self.norm, self.resize)
        if image.dim() != 3 or tuple(image.shape) != (3, self.img_size, self.img_size):
            size = self.img_size
            raise ConfigError("image", f"expected a preprocessed (3, {size}, {size}) tensor, "
                                       f"got {tuple(image.shape)}")
        return image

    def predict(self, images: Sequence[Image.Image | Tensor] | Image.Image | Tensor, *,
                class_name: str | None = None, threshold: float | None = None) -> list[Prediction]:
        """Score images like :meth:`Detector.predict` with the class inferred (forcing it is not exported)."""
        if class_name is not None:
            raise ConfigError("--class", "forcing the class is not supported by the exported ONNX graph "
                                         "(it always infers the class); score with the run instead")
        if isinstance(images, Image.Image) or (isinstance(images, Tensor) and images.dim() != 4):
            images = [images]
        check_threshold_arg(threshold)
        batch = torch.stack([self.preprocess(im) for im in images]).float().cpu().numpy()
        maps, scores, classes, conf = self.session.run(None, {INPUT_NAME: batch})
        sizes = [im.size if isinstance(im, Image.Image) else None for im in images]
        return to_predictions(maps, scores, classes, conf, self._class_names, self.thresholds, threshold,
                              str(self.source), sizes=sizes)
