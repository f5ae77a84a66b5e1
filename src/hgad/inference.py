"""Scoring images with a trained model: whole test sets (``hgad test``) and single images (``predict``).

Two protocols (docs/method.md, "Scoring"): ``deploy`` normalises with statistics stored at training, so an image's
map depends on that image alone; ``paper`` normalises by each class's whole test set as the release
does (it reproduces the published numbers and cannot score a lone image). Two class sources (same page,
"Which class scores an image"): ``known`` uses the ground-truth class, ``inferred`` the class of highest posterior.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from hgad import distributed
from hgad.calibration import Calibration, image_logp, load_calibration
from hgad.checkpoint import load_model
from hgad.data import Catalog, ImageDataset, ImageRecord, preprocess
from hgad.errors import ConfigError, InputError
from hgad.geometry import content_box
from hgad.metrics import image_metrics, pixel_metrics, summarise
from hgad.model import HGAD, LatentMaps
from hgad.review import hardest
from hgad.stats import MapStats, compute_map_stats
from hgad.thresholds import decision_metrics
from hgad.training import resolve_device

__all__ = ["PROTOCOLS", "CLASS_SOURCES", "Prediction", "Detector", "EvalResult", "evaluate"]

PROTOCOLS = ("deploy", "paper")
CLASS_SOURCES = ("inferred", "known")
_HIST_CAP = 20_000  # latent vectors kept per class and group for the likelihood histograms


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
        from hgad.calibration import load_calibration, train_calibrated
        from hgad.cli import _data_record
        from hgad.config import preset as make_config
        from hgad.data import discover

        cfg = make_config(preset, **overrides)
        catalog = discover(list(data), classes, need_test=False)
        model = HGAD(cfg, catalog.classes).to(resolve_device(cfg.device))
        train_calibrated(model, catalog.train, Path(out), resume=resume, progress=progress, log=lambda *_: None,
                         extra_config={"data": _data_record(list(data))})
        return cls(model.eval(), str(out), load_calibration(Path(out)))

    def save(self, run_dir: str | Path) -> None:
        """Write config.json and model.safetensors (atomically) to ``run_dir``."""
        from hgad.checkpoint import save_model, save_run_config

        save_run_config(Path(run_dir), self.model)
        save_model(Path(run_dir), self.model)

    def evaluate(self, data: Sequence[str], *, protocol: str = "deploy", class_source: str = "inferred",
                 classes: Sequence[str] | None = None, progress: bool = False) -> EvalResult:
        """Metrics on the test split of ``data``; same as ``hgad test``."""
        from hgad.data import discover

        catalog = discover(list(data), classes, need_train=False)
        return evaluate(self.model, catalog, protocol=protocol, class_source=class_source, progress=progress)

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def resize(self) -> str:
        """How images are made square (:mod:`hgad.geometry`); maps go back to the image with it."""
        return self.model.cfg.resize

    def preprocess(self, image: Image.Image | Tensor) -> Tensor:
        if isinstance(image, Image.Image):
            return preprocess(image, self.model.cfg.img_size, self.model.input_norm, self.model.cfg.resize)
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
        if threshold is not None and not np.isfinite(threshold):
            raise ConfigError("--threshold", f"must be a finite number, got {threshold}")
        lm = model.latent_maps(model.extract(batch), classes)
        maps = model.deploy_maps(lm).cpu()
        check_finite_maps(maps, self.source)
        sizes = [im.size if isinstance(im, Image.Image) else None for im in images]
        full = (0.0, 0.0, 1.0, 1.0)  # a preprocessed tensor: where the image lies is unknown
        logp = image_logp(lm, [content_box(*s, model.cfg.resize) if s else full for s in sizes]).cpu()
        out = []
        for i in range(len(batch)):
            c = int(lm.classes[i])
            thr = float(model.threshold[c]) if threshold is None else threshold
            check_threshold(thr, model.class_names[c], self.source)
            score = float(maps[i].max())
            conf = float(lm.posterior[i, c]) if lm.posterior is not None else float("nan")
            unknown = self.calibration is not None and self.calibration.is_unknown(model.class_names[c],
                                                                                    float(logp[i]))
            out.append(Prediction(score=score, anomaly_map=maps[i].numpy(), class_index=c,
                                  class_name=model.class_names[c], class_confidence=conf, threshold=thr,
                                  is_anomalous=score > thr, is_unknown=unknown, image_size=sizes[i]))
        return out


def check_finite_maps(maps: Tensor | np.ndarray, source: str, what: str = "the scored images") -> None:
    """Non-finite anomaly maps are a damaged model or statistics, never "normal": stop with one line."""
    values = torch.as_tensor(maps)
    if not bool(torch.isfinite(values).all()):
        raise InputError(source, f"the model gives non-finite (NaN/inf) anomaly scores for {what}; its weights "
                                 "or stored statistics are damaged (retrain, or restore the run)")


def check_threshold(value: float, class_name: str, source: str) -> None:
    """A stored threshold that is not finite would call every image normal (inf) or none (nan)."""
    if not np.isfinite(value):
        raise InputError(source, f"stored decision threshold of class {class_name!r} is {value}, not a finite "
                                 "number (calibration did not finish or the run is damaged); give --threshold "
                                 "or retrain")


@dataclass
class EvalResult:
    """Everything ``hgad test`` reports."""

    protocol: str
    class_source: str
    score: str  # the pixel score the maps were made with
    per_class: dict[str, dict[str, float]]
    mean: dict[str, float]
    class_accuracy: float | None  # image-level accuracy of the class used for scoring
    records: list[ImageRecord]
    scores: np.ndarray  # (N,) image scores
    predicted: np.ndarray  # (N,) model class index used for scoring
    model_classes: list[str] = field(default_factory=list)  # names of those indices
    unseen: list[str] = field(default_factory=list)  # dataset classes the model was not trained on
    histograms: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # class -> normal/anomalous logp
    examples: dict[str, list[dict]] = field(default_factory=dict)  # class -> [{record, map}]
    image_only: list[str] = field(default_factory=list)  # classes with defects but no masks: no pixel metrics
    warnings: list[str] = field(default_factory=list)  # for stderr: e.g. anomalous images with empty masks
    thresholds: np.ndarray | None = None  # (N,) deployed threshold that decided each image (deploy, run's score)
    resize: str = "crop"  # how the model made the images square (hgad.geometry), for the report's thumbnails


def _class_mapping(model: HGAD, catalog: Catalog, class_source: str) -> tuple[dict[int, int], list[str]]:
    known = model.class_names
    mapping, unseen = {}, []
    for i, name in enumerate(catalog.classes):
        if name in known:
            mapping[i] = known.index(name)
        else:
            unseen.append(name)
            mapping[i] = -1
    if unseen and class_source == "known":
        raise ConfigError("--data", f"class(es) {', '.join(unseen)} not in the model; it knows: {', '.join(known)}"
                                    " (use --class-source inferred to score them anyway)")
    return mapping, unseen


def _vector_groups(logp: Tensor, mask: Tensor, label: int) -> tuple[Tensor, Tensor]:
    """Finest-scale log-likelihoods split into normal and defective vectors (mask-downsampled)."""
    h, w = logp.shape
    if label == 0:
        return logp.flatten(), logp.new_empty(0)
    if mask.sum() == 0:  # anomalous image without a mask: all its vectors count as anomalous
        return logp.new_empty(0), logp.flatten()
    cover = torch.nn.functional.adaptive_avg_pool2d(mask[None, None].float(), (h, w))[0, 0] > 0.5
    return logp[~cover], logp[cover]


@torch.no_grad()
def evaluate(model: HGAD, catalog: Catalog, *, protocol: str = "deploy", class_source: str = "inferred",
             batch_size: int = 8, progress: bool = True, n_examples: int = 3, num_workers: int = 0,
             score: str | None = None) -> EvalResult:
    """Score the test split of ``catalog`` and compute the metrics per class and their mean.

    ``score`` re-scores with another pixel score (``product``, ``logp``, ``entropy``) without retraining.
    """
    score = model.score_kind(score)
    if protocol not in PROTOCOLS:
        raise ConfigError("--protocol", f"must be one of {', '.join(PROTOCOLS)}")
    if class_source not in CLASS_SOURCES:
        raise ConfigError("--class-source", f"must be one of {', '.join(CLASS_SOURCES)}")
    if not catalog.test:
        raise ConfigError("--data", "the dataset has no test images")
    mapping, unseen = _class_mapping(model, catalog, class_source)
    if protocol == "paper" and unseen:
        raise ConfigError("--protocol", "paper protocol needs every test class in the model")
    if protocol == "deploy" and not bool(model.calibrated):
        raise ConfigError("--protocol", "the model has no deploy statistics; use --protocol paper")
    records = list(catalog.test)
    cfg = model.cfg
    n = len(records)
    # under torchrun each rank scores every world_size-th batch (whole batches: per-image results as alone)
    ctx = distributed.context()
    loader = torch.utils.data.DataLoader(ImageDataset(records, cfg.img_size, cfg.map_size, model.input_norm,
                                                      cfg.resize),
                                         batch_sampler=distributed.shard_batches(n, batch_size, ctx),
                                         num_workers=num_workers)
    true_model_cls = torch.tensor([mapping[r.class_index] for r in records])
    masks = torch.zeros((n, cfg.map_size, cfg.map_size), dtype=torch.bool)
    maps = torch.zeros((n, cfg.map_size, cfg.map_size))
    predicted = torch.zeros(n, dtype=torch.long)
    kept: list[LatentMaps] = []
    hist: dict[str, dict[str, list[Tensor]]] = {c: {"normal": [], "anomalous": []} for c in catalog.classes}
    parts: list[dict] = []
    for batch in tqdm(loader, desc=f"test ({protocol}, {class_source})", unit="batch", disable=not progress):
        idx = batch["index"]
        known = true_model_cls[idx] if class_source == "known" else None
        lm = model.latent_maps(model.extract(batch["image"]), known)
        lm = LatentMaps(logp=[m.cpu() for m in lm.logp], ent=[m.cpu() for m in lm.ent] if lm.ent else None,
                        posterior=None, classes=lm.classes.cpu())
        part = {"idx": idx, "classes": lm.classes, "mask": batch["mask"][:, 0] > 0.5,
                "groups": [_vector_groups(lm.logp[0][j], batch["mask"][j, 0], int(batch["label"][j]))
                           for j in range(len(idx))]}
        if protocol == "deploy":
            part["maps"] = model.deploy_maps(_to(lm, model.device), score=score).cpu()
        else:
            part["lm"] = lm
        parts.append(part)
    empty_masks: list[str] = []
    for part in parts:
        for j, i in enumerate(part["idx"].tolist()):
            rec = records[i]
            if rec.label == 1 and rec.mask_path is not None and not bool(part["mask"][j].any()):
                empty_masks.append(str(rec.mask_path))
    for part in sorted(distributed.all_gather_list(parts, ctx), key=lambda p: int(p["idx"][0])):
        idx = part["idx"]
        predicted[idx] = part["classes"]
        masks[idx] = part["mask"]
        for i, groups in zip(idx.tolist(), part["groups"]):
            name = records[i].class_name
            hist[name]["normal"].append(groups[0])
            hist[name]["anomalous"].append(groups[1])
        if protocol == "deploy":
            maps[idx] = part["maps"]
        else:
            kept.append(part["lm"])
    if protocol == "paper":
        # statistics of each class's whole test set, grouped by the ground-truth class (as the release)
        logp = [torch.cat(level) for level in zip(*(k.logp for k in kept))]
        ent = [torch.cat(level) for level in zip(*(k.ent for k in kept))] if kept[0].ent is not None else None
        stats: tuple[MapStats, MapStats | None] = (
            compute_map_stats(logp, true_model_cls, model.n_classes, cfg.map_size),
            compute_map_stats(ent, true_model_cls, model.n_classes, cfg.map_size) if ent else None)
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            lm = LatentMaps(logp=[m[sl] for m in logp], ent=[m[sl] for m in ent] if ent else None,
                            posterior=None, classes=predicted[sl])
            maps[sl] = model.maps(_to(lm, model.device), stats, clamp=False,
                                  stat_classes=true_model_cls[sl], score=score).cpu()
    scores = maps.flatten(1).amax(1)
    bad = (~torch.isfinite(maps.flatten(1))).any(1).nonzero().flatten()
    if len(bad):
        check_finite_maps(maps, "model", f"{len(bad)} of {n} test images (first: {records[int(bad[0])].path})")
    labels = torch.tensor([r.label for r in records])
    cls_idx = torch.tensor([r.class_index for r in records])
    # the stored thresholds decide only what they were calibrated for: deploy maps of the run's own score
    thresholds = model.threshold.cpu()[predicted].numpy().astype(np.float64) \
        if protocol == "deploy" and score == model.score_kind() and bool(torch.isfinite(model.threshold).all()) \
        else None
    per_class: dict[str, dict[str, float]] = {}
    examples: dict[str, list[dict]] = {}
    image_only: list[str] = []
    for c, name in enumerate(catalog.classes):
        sel = (cls_idx == c).nonzero().flatten()
        if len(sel) == 0:
            continue
        m = image_metrics(scores[sel].numpy(), labels[sel].numpy())
        if not bool((labels[sel] == 0).any()):  # AP and F1-max of all-positive labels are trivially 1
            m["image_ap"] = m["image_f1max"] = float("nan")
        with_mask = sel[masks[sel].flatten(1).any(1) | (labels[sel] == 0)]
        if catalog.has_masks.get(name, False) and bool(masks[sel].any()):
            m.update(pixel_metrics(maps[with_mask].numpy(), masks[with_mask].numpy()))
        elif bool((labels[sel] == 1).any()):
            image_only.append(name)
        if thresholds is not None:
            m.update(decision_metrics(scores[sel].numpy(), labels[sel].numpy(), thresholds[sel.numpy()]))
        if mapping[c] >= 0:
            m["class_accuracy"] = float((predicted[sel] == mapping[c]).float().mean())
        per_class[name] = m
        defect, normal = hardest(sel.tolist(), labels.numpy(), scores.numpy(), thresholds, n_examples)
        examples[name] = [{"record": records[i], "map": maps[i].numpy(), "score": float(scores[i]),
                           "mask": masks[i].numpy(), "index": i} for i in defect + normal]
    seen = true_model_cls >= 0
    accuracy = float((predicted[seen] == true_model_cls[seen]).float().mean()) if bool(seen.any()) else None
    gen = torch.Generator().manual_seed(0)
    histograms = {}
    for name, groups in hist.items():
        histograms[name] = {}
        for g, parts in groups.items():
            v = torch.cat(parts) if parts else torch.empty(0)
            if len(v) > _HIST_CAP:
                v = v[torch.randperm(len(v), generator=gen)[:_HIST_CAP]]
            histograms[name][g] = v.numpy()
    return EvalResult(protocol=protocol, class_source=class_source, score=score, per_class=per_class,
                      mean=summarise(per_class), class_accuracy=accuracy, records=records,
                      scores=scores.numpy(), predicted=predicted.numpy(),
                      model_classes=model.class_names, unseen=unseen,
                      histograms=histograms, examples=examples, image_only=image_only, thresholds=thresholds,
                      resize=cfg.resize,
                      warnings=[f"{len(empty_masks)} anomalous test image(s) have a mask that is all black at "
                                f"map size {cfg.map_size} (first: {empty_masks[0]}); they add no defective "
                                "pixel to the pixel metrics"] if empty_masks else [])


def _to(lm: LatentMaps, device: torch.device) -> LatentMaps:
    return LatentMaps(logp=[m.to(device) for m in lm.logp], ent=[m.to(device) for m in lm.ent] if lm.ent else None,
                      posterior=None, classes=lm.classes.to(device))

