"""``hgad ablate``: the component ladder of HGAD, trained and tested on one dataset, seed and schedule.

The paper's argument is that a unified normalizing flow with a single Gaussian prior maps anomalies
to high likelihood too ("homogeneous mapping"), and that each part of the hierarchical prior helps.
This command makes that checkable on any dataset: it trains the single-Gaussian baseline and then
adds the inter-class mixture, the mutual-information loss, the entropy loss and the intra-class
centres one at a time, with every other setting equal. Each rung is an ordinary run folder (so
``hgad test`` works on it) and a finished rung is never recomputed, so an interrupted ladder resumes.

All rungs are scored with the deploy protocol under the ground-truth class (``known``): the
single-Gaussian baseline has no class posterior, so it cannot infer a class, and scoring every rung
the same way keeps the comparison about the prior and the losses alone. The memory bank of every rung
holds the flow's latents (``knn_space latent``): a bank of the flow's input (the ``fast`` default) would
give every rung the same map, whatever its prior and losses.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hgad.config import CHOICES, LEGACY_DEFAULTS, HGADConfig, config_from_dict
from hgad.errors import ConfigError, InputError
from hgad.report import percent

if TYPE_CHECKING:
    from torch import nn

    from hgad.model import HGAD

__all__ = ["Rung", "RUNGS", "LADDER_FLAGS", "PROTOCOL", "CLASS_SOURCE", "SCORES", "rung_config",
           "run_ablation", "ablation_markdown"]

PROTOCOL = "deploy"
CLASS_SOURCE = "known"
SCORES = CHOICES["score"]
# config fields the ladder sets itself, with their command-line spelling
LADDER_FLAGS = {"prior": "--prior", "use_mi": "--mi/--no-mi", "use_entropy": "--entropy-loss/--no-entropy-loss"}
EVAL_DIR = f"test-{PROTOCOL}-{CLASS_SOURCE}"
HIST_FILE = "ablation_vectors.npz"
_METRICS = ("image_auroc", "pixel_auroc", "aupro")
_HEAD = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "aupro": "AUPRO"}
# settings that do not change what a rung computes, so they may differ when a ladder is resumed
_RUNTIME_FIELDS = ("device", "num_workers")


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: a name for tables, its run folder and the settings it fixes."""

    name: str
    folder: str
    title: str
    overrides: dict[str, Any] = field(default_factory=dict)


RUNGS: tuple[Rung, ...] = (
    Rung("baseline", "1-baseline", "NF baseline: single N(0, I) prior", {"prior": "gaussian"}),
    Rung("+gmm", "2-gmm", "+ inter-class Gaussian mixture (L_g)",
         {"prior": "hgmm", "use_mi": False, "use_entropy": False, "n_intra": 1}),
    Rung("+mi", "3-mi", "+ mutual-information loss",
         {"prior": "hgmm", "use_mi": True, "use_entropy": False, "n_intra": 1}),
    Rung("+entropy", "4-entropy", "+ entropy loss",
         {"prior": "hgmm", "use_mi": True, "use_entropy": True, "n_intra": 1}),
    # the full model keeps the intra-class centre count of the preset / flags
    Rung("+intra", "5-intra", "+ intra-class centres (full HGAD)",
         {"prior": "hgmm", "use_mi": True, "use_entropy": True}),
)


@functools.cache
def _shared_backbone_type() -> type:
    """The backbone wrapper class, defined on first use so that loading the CLI does not import torch."""
    import torch
    from torch import nn

    class SharedBackbone(nn.Module):
        """The frozen backbone shared by every rung; an image batch seen before is answered from memory.

        Each rung extracts the same images in the same batches (training cache, test set, score
        variants), so all but the first extraction are lookups. Features are kept exactly as computed,
        up to ``budget_bytes``; past that, batches are computed as usual.
        """

        def __init__(self, inner: nn.Module, budget_bytes: int = 2 << 30) -> None:
            super().__init__()
            self.inner = inner
            self.feature_dims = inner.feature_dims
            self.norm = inner.norm
            self.scale_shapes = inner.scale_shapes
            self.budget_bytes = budget_bytes
            self.stored_bytes = 0
            self._memo: dict[tuple, list[torch.Tensor]] = {}

        def check_img_size(self, img_size: int) -> None:
            self.inner.check_img_size(img_size)

        def train(self, mode: bool = True) -> SharedBackbone:
            return super().train(False)

        @torch.no_grad()
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            data = x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
            key = (tuple(x.shape), str(x.device), hashlib.blake2b(data, digest_size=20).hexdigest())
            if key in self._memo:
                return list(self._memo[key])
            feats = self.inner(x)
            size = sum(f.numel() * f.element_size() for f in feats)
            if self.stored_bytes + size <= self.budget_bytes:
                self._memo[key] = list(feats)
                self.stored_bytes += size
            return feats

    return SharedBackbone


def _share_backbone(model: HGAD, shared: nn.Module | None) -> nn.Module:
    """Put the ladder's shared, memoising backbone into ``model`` (made from the model's own on first use)."""
    shared = shared if shared is not None else _shared_backbone_type()(model.backbone)
    model.backbone = shared
    return shared


def rung_config(base: HGADConfig, rung: Rung) -> HGADConfig:
    """``base`` with the rung's switches applied (everything else, seed and schedule included, kept)."""
    if "n_intra" not in rung.overrides and rung.overrides.get("prior") == "hgmm" and base.n_intra < 2:
        raise ConfigError("--intra-centers", f"the full-HGAD rung needs at least 2 intra-class centres, "
                                             f"got {base.n_intra}")
    # the map must read what the rung trained: the flow's latents, not its input
    return config_from_dict({**base.to_dict(), **rung.overrides, "knn_space": "latent"},
                            source=f"ablation rung {rung.name}")


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _RUNTIME_FIELDS}


def _check_existing(out: Path, cfgs: Sequence[HGADConfig], classes: list[str]) -> None:
    """Refuse to resume into rung folders made with other settings or classes (numbers would mix)."""
    from hgad.checkpoint import CONFIG_FILE, read_run_config

    for rung, cfg in zip(RUNGS, cfgs):
        run_dir = out / rung.folder
        if not (run_dir / CONFIG_FILE).is_file():
            continue
        saved = read_run_config(run_dir)
        # a folder of an earlier version lacks the keys added since: read it with the values it used
        old = _comparable(config_from_dict({**LEGACY_DEFAULTS, **saved["config"]}, source=str(run_dir)).to_dict())
        new = _comparable(cfg.to_dict())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise InputError(run_dir, f"was made with other settings ({', '.join(changed)}); use another --out "
                                      "or delete the folder")
        if list(saved["class_names"]) != classes:
            raise InputError(run_dir, f"was trained on other classes ({', '.join(saved['class_names'])}); "
                                      "use another --out or delete the folder")


def _vector_auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """AUROC of ``-logp`` separating anomalous from normal latent vectors (one global threshold)."""
    from hgad.metrics import auroc

    scores = -np.concatenate([normal, anomalous]).astype(np.float64)
    labels = np.concatenate([np.zeros(len(normal), np.int64), np.ones(len(anomalous), np.int64)])
    return auroc(scores, labels)


def _save_vectors(path: Path, histograms: dict[str, dict[str, np.ndarray]]) -> None:
    """Pooled finest-scale log-likelihoods of normal and anomalous test vectors (no pickle)."""
    from hgad.io import atomic_path

    pooled = {g: np.concatenate([h[g] for h in histograms.values()] or [np.empty(0)]).astype(np.float32)
              for g in ("normal", "anomalous")}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **pooled)


def _load_vectors(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {g: data[g] for g in ("normal", "anomalous")}
    except (OSError, ValueError, KeyError) as err:
        raise InputError(path, f"unreadable ablation vectors ({err}); delete it to recompute the rung") from None


def _read_metrics(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {"mean": data["mean"], "per_class": data["per_class"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"unreadable metrics ({err}); delete it to recompute the rung") from None


def _done(run_dir: Path, eval_dir: Path) -> bool:
    from hgad.checkpoint import MODEL_FILE

    return all(p.is_file() for p in (run_dir / MODEL_FILE, eval_dir / "metrics.json", run_dir / HIST_FILE))


def _train_summary(run_dir: Path) -> tuple[float | None, float | None]:
    """Training wall time and the training vectors' inter-class posterior accuracy of a rung."""
    import json

    from hgad.training import SUMMARY_FILE

    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    seconds, accuracy = summary.get("seconds_total"), summary.get("train_vector_class_accuracy")
    return (None if seconds is None else float(seconds)), (None if accuracy is None else float(accuracy))


def _summary(mean: dict[str, Any]) -> str:
    return ", ".join(f"{_HEAD[k]} {percent(_num(mean.get(k)))}" for k in _METRICS)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def run_ablation(data: Sequence[str], out: Path, base: HGADConfig, *, classes: Sequence[str] | None = None,
                 progress: bool = True, html: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and test every rung of :data:`RUNGS` into ``out/<rung folder>``; write the summary files.

    A rung whose folder already holds its model, metrics and vectors is read back, not recomputed; a
    rung interrupted during training resumes from its checkpoint. Returns the ``ablation.json`` payload.
    """
    from hgad.data import discover
    from hgad.device import resolve_device
    from hgad.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    out = Path(out)
    data = [str(d) for d in data]
    cfgs = [rung_config(base, rung) for rung in RUNGS]
    catalog = discover(data, classes)
    _check_existing(out, cfgs, catalog.classes)
    device = resolve_device(base.device)
    backbone: nn.Module | None = None  # frozen and equal for every rung: built once
    rows: list[dict[str, Any]] = []
    vectors: dict[str, dict[str, np.ndarray]] = {}
    variants: dict[str, dict[str, Any]] = {}
    for i, (rung, cfg) in enumerate(zip(RUNGS, cfgs), start=1):
        run_dir, eval_dir = out / rung.folder, out / rung.folder / EVAL_DIR
        tag = f"[{i}/{len(RUNGS)}] {rung.name}"
        skipped = _done(run_dir, eval_dir)
        model = None
        if skipped:
            log(f"{tag}: already done in {run_dir}, skipped")
        else:
            model, backbone = _train_and_test(rung, cfg, run_dir, catalog, data, device, backbone, tag,
                                              progress=progress, html=html, log=log)
        metrics = _read_metrics(eval_dir / "metrics.json")
        vectors[rung.name] = _load_vectors(run_dir / HIST_FILE)
        row = _row(rung, cfg, run_dir, metrics, vectors[rung.name], skipped)
        rows.append(row)
        log(f"{tag}: {_summary(row['mean'])}, vector AUROC {percent(row['vector_auroc'])}")
        if rung is RUNGS[-1]:
            variants = _score_variants(run_dir, model, backbone, cfg, metrics, catalog, device, progress, log,
                                       tag)
    payload = {"data": data, "classes": catalog.classes, "protocol": PROTOCOL, "class_source": CLASS_SOURCE,
               "settings": _comparable(cfgs[-1].to_dict()), "rungs": rows, "score_variants": variants}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ablation.json", _json_safe(payload))
    atomic_write_text(out / "ablation.md", ablation_markdown(payload))
    atomic_write_bytes(out / "ablation.png", _figure_png(rows, vectors))
    return payload


def _train_and_test(rung: Rung, cfg: HGADConfig, run_dir: Path, catalog, data: list[str], device,
                    backbone: nn.Module | None, tag: str, *, progress: bool, html: bool,
                    log: Callable[[str], None]) -> tuple[HGAD, nn.Module]:
    """Train a rung (or resume it, or load its finished model), test it and keep its vectors; the model
    and the shared backbone (made from this model's on first use)."""
    from hgad.checkpoint import MODEL_FILE, RESUME_FILE, load_model
    from hgad.evaluation import evaluate
    from hgad.model import HGAD
    from hgad.report import write_reports
    from hgad.training import fit

    if (run_dir / MODEL_FILE).is_file():
        log(f"{tag}: trained model found in {run_dir}, testing it")
        model = load_model(run_dir, device)
        backbone = _share_backbone(model, backbone)
    else:
        resume = (run_dir / RESUME_FILE).is_file()
        log(f"{tag}: {'resuming' if resume else 'training'} {rung.title} in {run_dir}")
        model = HGAD(cfg, catalog.classes, backbone=backbone).to(device)
        backbone = _share_backbone(model, backbone)
        fit(model, catalog.train, run_dir, resume=resume, progress=progress, log=log, extra_config={"data": data})
    t0 = time.perf_counter()
    result = evaluate(model.eval(), catalog, protocol=PROTOCOL, class_source=CLASS_SOURCE, progress=progress,
                      num_workers=cfg.num_workers)
    write_reports(result, run_dir / EVAL_DIR, html=html, seconds=time.perf_counter() - t0)
    _save_vectors(run_dir / HIST_FILE, result.histograms)
    return model, backbone


def _row(rung: Rung, cfg: HGADConfig, run_dir: Path, metrics: dict[str, Any], vec: dict[str, np.ndarray],
         skipped: bool) -> dict[str, Any]:
    """A rung's line of ablation.json: its switches, metrics, vector AUROC and training summary."""
    row = {"name": rung.name, "folder": rung.folder, "title": rung.title,
           "prior": cfg.prior, "use_mi": cfg.prior == "hgmm" and cfg.use_mi,
           "use_entropy": cfg.prior == "hgmm" and cfg.use_entropy,
           "n_intra": cfg.n_intra if cfg.prior == "hgmm" else None, "score": cfg.score,
           "mean": metrics["mean"], "per_class": metrics["per_class"],
           "vector_auroc": _vector_auroc(vec["normal"], vec["anomalous"]),
           "n_vectors": {g: len(v) for g, v in vec.items()},
           "skipped": skipped}
    row["train_seconds"], row["train_class_accuracy"] = _train_summary(run_dir)
    return row


def _score_variants(run_dir: Path, model: HGAD | None, backbone: nn.Module | None, cfg: HGADConfig, own: dict[str, Any],
                    catalog, device, progress: bool, log: Callable[[str], None], tag: str
                    ) -> dict[str, dict[str, Any]]:
    """Mean metrics of the full model under each pixel score: the same weights, only re-scored.

    A variant is the trained model scored with another ``score`` (``model`` is ``None`` when the rung
    was skipped: then it is loaded once).
    """
    from hgad.checkpoint import load_model
    from hgad.evaluation import evaluate
    from hgad.map_stats import SCORE_PARTS
    from hgad.report import write_reports

    found: dict[str, dict[str, Any]] = {}
    for score in SCORES:
        if score == cfg.score:
            found[score] = own["mean"]
            continue
        parts = SCORE_PARTS[score]
        if ("maha" in parts and not cfg.latent_gauss) or ("knn" in parts and not cfg.latent_knn):
            continue  # the run has no class Gaussians of the latents / no memory bank
        eval_dir = run_dir / f"{EVAL_DIR}-score-{score}"
        if not (eval_dir / "metrics.json").is_file():
            log(f"{tag}: re-scoring with --score {score}")
            if model is None:
                model = load_model(run_dir, device)
                backbone = _share_backbone(model, backbone)
            t0 = time.perf_counter()
            result = evaluate(model, catalog, protocol=PROTOCOL, class_source=CLASS_SOURCE, progress=progress,
                              num_workers=cfg.num_workers, score=score)
            write_reports(result, eval_dir, html=False, seconds=time.perf_counter() - t0)
        found[score] = _read_metrics(eval_dir / "metrics.json")["mean"]
        log(f"{tag} --score {score}: {_summary(found[score])}")
    return found


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _tick(flag: bool) -> str:
    return "✓" if flag else "–"


def ablation_markdown(payload: dict[str, Any]) -> str:
    """The ladder table (means in %), per-class image AUROC and the full model's score variants."""
    rows = payload["rungs"]
    s = payload["settings"]
    lines = [
        f"Data {', '.join(payload['data'])} ({len(payload['classes'])} classes); every rung: backbone "
        f"{s['backbone']}, {s['meta_epochs']}×{s['sub_epochs']} passes, batch {s['batch_size']}, lr {s['lr']}, "
        f"seed {s['seed']}.",
        "",
        f"Protocol `{payload['protocol']}`, class source `{payload['class_source']}`: every rung scores an image "
        "under its ground-truth class, because the single-Gaussian baseline has no class posterior and cannot "
        "infer one. Means over classes, in %. *Vector AUROC*: finest-scale log-likelihood of normal vs "
        "anomalous test vectors pooled over all classes, one global threshold, no normalisation. *Class acc.*: "
        "training vectors whose most probable inter-class component is their own class. *Train s*: wall time.",
        "",
        "| # | rung | prior | L_mi | L_e | intra K | score | I-AUROC | P-AUROC | AUPRO | vector AUROC "
        "| class acc. | train s |",
        "|---|---|---|:-:|:-:|:-:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows, start=1):
        secs = "–" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        prior = "N(0, I)" if r["prior"] == "gaussian" else "GMM"
        intra = "–" if r["n_intra"] is None else str(r["n_intra"])
        metrics = " | ".join(percent(_num(r["mean"].get(k))) for k in _METRICS)
        lines.append(f"| {i} | {r['name']} | {prior} | {_tick(r['use_mi'])} | {_tick(r['use_entropy'])} | {intra} "
                     f"| {r['score']} | {metrics} | {percent(_num(r['vector_auroc']))} "
                     f"| {percent(_num(r['train_class_accuracy']))} | {secs} |")
    lines += ["", "Per-class image AUROC (%):", "",
              "| class | " + " | ".join(r["name"] for r in rows) + " |", "|---|" + "---:|" * len(rows)]
    for name in payload["classes"]:
        cells = [percent(_num(r["per_class"].get(name, {}).get("image_auroc"))) for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if payload["score_variants"]:
        lines += ["", f"Full HGAD ({rows[-1]['name']}) re-scored with each pixel score (same weights):", "",
                  "| score | " + " | ".join(_HEAD[k] for k in _METRICS) + " |", "|---|" + "---:|" * len(_METRICS)]
        for score, mean in payload["score_variants"].items():
            lines.append(f"| {score} | " + " | ".join(percent(_num(mean.get(k))) for k in _METRICS) + " |")
    return "\n".join(lines) + "\n"


def _figure_png(rows: list[dict[str, Any]], vectors: dict[str, dict[str, np.ndarray]]) -> bytes:
    """Side-by-side log-likelihood histograms, baseline vs full HGAD (the paper's Fig. 2b / 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [rows[0], rows[-1]]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown), 3.4), squeeze=False)
    for ax, row in zip(axes[0], shown):
        groups = vectors[row["name"]]
        values = [v for v in groups.values() if len(v)]
        if not values:
            ax.set_axis_off()
            continue
        lo, hi = np.percentile(np.concatenate(values), [0.5, 99.9])
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 60)
        for group, colour in (("normal", "tab:blue"), ("anomalous", "tab:red")):
            v = groups[group]
            if len(v):
                ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, density=True, alpha=0.55, color=colour,
                        label=f"{group} ({len(v):,} vectors)")
        ax.set_title(f"{row['title']}\nvector AUROC {percent(_num(row['vector_auroc']))} %, "
                     f"image AUROC {percent(_num(row['mean'].get('image_auroc')))} %", fontsize=9)
        ax.set_xlabel("log-likelihood per dimension (finest scale)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
