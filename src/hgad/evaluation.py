"""Dataset-level evaluation (``hgad test``): score a catalog's test split and compute the metrics.

Two protocols (docs/method.md, "Scoring"): ``deploy`` normalises with statistics stored at training, so an image's
map depends on that image alone; ``paper`` normalises by each class's whole test set as the release
does (it reproduces the published numbers and cannot score a lone image). Two class sources (same page,
"Which class scores an image"): ``known`` uses the ground-truth class, ``inferred`` the class of highest posterior.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hgad import distributed
from hgad.data import Catalog, ImageDataset, ImageRecord
from hgad.errors import ConfigError
from hgad.map_stats import SCORE_PARTS, MapStats, Normalisation, compute_map_stats
from hgad.metrics import by_defect_type, image_metrics, pixel_metrics, summarise
from hgad.model import HGAD, LatentMaps
from hgad.review import hardest
from hgad.scoring import check_finite_maps
from hgad.thresholds import decision_metrics

__all__ = ["PROTOCOLS", "CLASS_SOURCES", "EvalResult", "evaluate"]

PROTOCOLS = ("deploy", "paper")
CLASS_SOURCES = ("inferred", "known")
_HIST_CAP = 20_000  # latent vectors kept per class and group for the likelihood histograms


@dataclass
class EvalResult:
    """Everything ``hgad test`` reports."""

    protocol: str
    class_source: str
    score: str  # the pixel score the maps were made with
    per_class: dict[str, dict[str, float]]
    mean: dict[str, float]
    per_defect: dict[str, dict[str, dict[str, float]]]  # class -> defect type -> n, image_auroc (, thr_recall)
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
             score: str | None = None, score_scales: int | None = None) -> EvalResult:
    """Score the test split of ``catalog`` and compute the metrics per class and their mean.

    ``score`` re-scores with another pixel score (``product``, ``logp``, ``entropy``, ``mahalanobis``, ``knn``,
    ``mahalanobis+knn``) without retraining; ``score_scales`` sums that many finest scales (0: all) instead of
    the run's own number (deploy protocol). The paper protocol normalises like the release, which has
    neither the class-Gaussian nor the memory-bank map: a model configured with them is scored there with
    the release's ``product``.
    """
    if protocol == "paper" and score is None and set(SCORE_PARTS[model.score_kind()]) & {"maha", "knn"}:
        score = "product"
    score = model.score_kind(score)
    if score_scales is not None and protocol != "deploy":
        raise ConfigError("--score-scales", "applies to the deploy protocol (the paper protocol normalises "
                                            "like the release, over every scale)")
    norm = model.deploy_norm(score_scales)  # refuses a bad number before any image is read
    mapping, unseen = _check_request(model, catalog, protocol, class_source)
    records = list(catalog.test)
    true_model_cls = torch.tensor([mapping[r.class_index] for r in records])
    parts = _score_batches(model, records, true_model_cls, protocol=protocol, class_source=class_source,
                           score=score, norm=norm, batch_size=batch_size, num_workers=num_workers,
                           progress=progress)
    empty_masks = _empty_masks(parts, records)
    scored = _gather(parts, records, catalog.classes, model.cfg.map_size, protocol)
    if protocol == "paper":
        scored.maps = _paper_maps(model, scored.kept, true_model_cls, scored.predicted, score, batch_size)
    maps, masks, predicted = scored.maps, scored.masks, scored.predicted
    scores = maps.flatten(1).amax(1)
    bad = (~torch.isfinite(maps.flatten(1))).any(1).nonzero().flatten()
    if len(bad):
        first = records[int(bad[0])].path
        check_finite_maps(maps, "model", f"{len(bad)} of {len(records)} test images (first: {first})")
    thresholds = _deployed_thresholds(model, protocol, score, norm, predicted)
    per_class, per_defect, examples, image_only = _per_class(catalog, records, maps, masks, scores, predicted,
                                                             mapping, n_examples, thresholds)
    seen = true_model_cls >= 0
    accuracy = float((predicted[seen] == true_model_cls[seen]).float().mean()) if bool(seen.any()) else None
    return EvalResult(protocol=protocol, class_source=class_source, score=score, per_class=per_class,
                      mean=summarise(per_class),
                      per_defect=per_defect,
                      class_accuracy=accuracy, records=records,
                      scores=scores.numpy(), predicted=predicted.numpy(),
                      model_classes=model.class_names, unseen=unseen,
                      histograms=_histograms(scored.hist), examples=examples, image_only=image_only,
                      thresholds=thresholds, resize=model.cfg.resize,
                      warnings=[f"{len(empty_masks)} anomalous test image(s) have a mask that is all black at "
                                f"map size {model.cfg.map_size} (first: {empty_masks[0]}); they add no defective "
                                "pixel to the pixel metrics"] if empty_masks else [])


def _deployed_thresholds(model: HGAD, protocol: str, score: str, norm: Normalisation, predicted: Tensor
                         ) -> np.ndarray | None:
    """(N,) stored threshold of each image's scoring class; None where they do not apply: they were
    calibrated for the deploy maps of the run's own score and scales only."""
    if protocol != "deploy" or score != model.score_kind() or norm.scales != model.cfg.score_scales \
            or not bool(torch.isfinite(model.threshold).all()):
        return None
    return model.threshold.cpu()[predicted].numpy().astype(np.float64)


def _check_request(model: HGAD, catalog: Catalog, protocol: str, class_source: str
                   ) -> tuple[dict[int, int], list[str]]:
    """Refuse impossible evaluations before any image is read; the catalog-to-model class mapping."""
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
    return mapping, unseen


def _score_batches(model: HGAD, records: list[ImageRecord], true_model_cls: Tensor, *, protocol: str,
                   class_source: str, score: str, norm: Normalisation, batch_size: int, num_workers: int,
                   progress: bool) -> list[dict]:
    """This process's share of the test images, batch by batch: classes, masks, histogram groups and
    either the deploy maps or (paper) the latent maps, which need the whole set's statistics first."""
    cfg = model.cfg
    # under torchrun each rank scores every world_size-th batch (whole batches: per-image results as alone)
    ctx = distributed.context()
    loader = torch.utils.data.DataLoader(ImageDataset(records, cfg.img_size, cfg.map_size, model.input_norm,
                                                      cfg.resize),
                                         batch_sampler=distributed.shard_batches(len(records), batch_size, ctx),
                                         num_workers=num_workers)
    parts: list[dict] = []
    for batch in tqdm(loader, desc=f"test ({protocol}, {class_source})", unit="batch", disable=not progress):
        idx = batch.index
        known = true_model_cls[idx] if class_source == "known" else None
        lm = model.latent_maps(model.extract(batch.image), known,
                               knn=protocol == "deploy" and model.reads_knn(score)).to("cpu")
        part = {"idx": idx, "classes": lm.classes, "mask": batch.mask[:, 0] > 0.5,
                "groups": [_vector_groups(lm.logp[0][j], batch.mask[j, 0], int(batch.label[j]))
                           for j in range(len(idx))]}
        if protocol == "deploy":
            part["maps"] = model.score_latent(lm.to(model.device), score=score, norm=norm).maps.cpu()
        else:
            part["lm"] = lm
        parts.append(part)
    return parts


def _empty_masks(parts: list[dict], records: list[ImageRecord]) -> list[str]:
    """Mask files of anomalous images that are all black at map size (they add no defective pixel)."""
    empty: list[str] = []
    for part in parts:
        for j, i in enumerate(part["idx"].tolist()):
            rec = records[i]
            if rec.label == 1 and rec.mask_path is not None and not bool(part["mask"][j].any()):
                empty.append(str(rec.mask_path))
    return empty


@dataclass
class _Gathered:
    """Every process's batches put back in image order."""

    predicted: Tensor  # (N,) model class index used for scoring
    masks: Tensor  # (N, M, M) bool
    maps: Tensor  # (N, M, M); zeros until the paper protocol's maps are made
    kept: list[LatentMaps]  # paper protocol: latent maps in image order
    hist: dict[str, dict[str, list[Tensor]]]  # class -> normal/anomalous finest-scale log-likelihoods


def _gather(parts: list[dict], records: list[ImageRecord], classes: list[str], map_size: int,
            protocol: str) -> _Gathered:
    n = len(records)
    out = _Gathered(predicted=torch.zeros(n, dtype=torch.long),
                    masks=torch.zeros((n, map_size, map_size), dtype=torch.bool),
                    maps=torch.zeros((n, map_size, map_size)), kept=[],
                    hist={c: {"normal": [], "anomalous": []} for c in classes})
    for part in sorted(distributed.all_gather_list(parts, distributed.context()), key=lambda p: int(p["idx"][0])):
        idx = part["idx"]
        out.predicted[idx] = part["classes"]
        out.masks[idx] = part["mask"]
        for i, groups in zip(idx.tolist(), part["groups"]):
            name = records[i].class_name
            out.hist[name]["normal"].append(groups[0])
            out.hist[name]["anomalous"].append(groups[1])
        if protocol == "deploy":
            out.maps[idx] = part["maps"]
        else:
            out.kept.append(part["lm"])
    return out


def _paper_maps(model: HGAD, kept: list[LatentMaps], true_model_cls: Tensor, predicted: Tensor, score: str,
                batch_size: int) -> Tensor:
    """The paper protocol: statistics of each class's whole test set, grouped by the ground-truth class (as
    the release), applied to every image of that class."""
    cfg = model.cfg
    n = len(true_model_cls)
    logp = [torch.cat(level) for level in zip(*(k.logp for k in kept))]
    ent = [torch.cat(level) for level in zip(*(k.ent for k in kept))] if kept[0].ent is not None else None
    stats: tuple[MapStats, MapStats | None] = (
        compute_map_stats(logp, true_model_cls, model.n_classes, cfg.map_size),
        compute_map_stats(ent, true_model_cls, model.n_classes, cfg.map_size) if ent else None)
    norm = Normalisation(stats[0], stats[1], clamp=False)
    maps = torch.zeros((n, cfg.map_size, cfg.map_size))
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        lm = LatentMaps(logp=[m[sl] for m in logp], ent=[m[sl] for m in ent] if ent else None,
                        posterior=None, classes=predicted[sl])
        maps[sl] = model.score_latent(lm.to(model.device), score=score, norm=norm,
                                      stat_classes=true_model_cls[sl]).maps.cpu()
    return maps


def _per_class(catalog: Catalog, records: list[ImageRecord], maps: Tensor, masks: Tensor, scores: Tensor,
               predicted: Tensor, mapping: dict[int, int], n_examples: int, thresholds: np.ndarray | None
               ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]], dict[str, list[dict]],
                          list[str]]:
    """Metrics of each class (with the deployed thresholds' when given), those of each defect type of a
    class with defects, the report's example images (the worst decisions first) and the classes scored on
    image labels only."""
    labels = torch.tensor([r.label for r in records])
    cls_idx = torch.tensor([r.class_index for r in records])
    types = np.array([r.defect_type for r in records], dtype=object)
    per_class: dict[str, dict[str, float]] = {}
    per_defect: dict[str, dict[str, dict[str, float]]] = {}
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
        if bool((labels[sel] == 1).any()):
            per_defect[name] = by_defect_type(scores[sel].numpy(), labels[sel].numpy(), types[sel.numpy()],
                                              None if thresholds is None else thresholds[sel.numpy()])
        if mapping[c] >= 0:
            m["class_accuracy"] = float((predicted[sel] == mapping[c]).float().mean())
        per_class[name] = m
        defect, normal = hardest(sel.tolist(), labels.numpy(), scores.numpy(), thresholds, n_examples)
        examples[name] = [{"record": records[i], "map": maps[i].numpy(), "score": float(scores[i]),
                           "mask": masks[i].numpy(), "index": i} for i in defect + normal]
    return per_class, per_defect, examples, image_only


def _histograms(hist: dict[str, dict[str, list[Tensor]]]) -> dict[str, dict[str, np.ndarray]]:
    """Per class and group, the finest-scale log-likelihoods (a seeded sample of at most _HIST_CAP)."""
    gen = torch.Generator().manual_seed(0)
    histograms: dict[str, dict[str, np.ndarray]] = {}
    for name, groups in hist.items():
        histograms[name] = {}
        for g, parts in groups.items():
            v = torch.cat(parts) if parts else torch.empty(0)
            if len(v) > _HIST_CAP:
                v = v[torch.randperm(len(v), generator=gen)[:_HIST_CAP]]
            histograms[name][g] = v.numpy()
    return histograms

