"""Evaluation reports: ``metrics.json``, a Markdown table, ``image_scores.csv`` and a self-contained ``report.html``.

The HTML embeds its figures (compact JPEG thumbnails, one PNG chart) so it can be mailed or archived
as one file. It is written for the person who deploys the model: the deployed threshold of each class
and what it decides, the worst misses and false alarms first, ground truth beside each map,
per-class log-likelihood histograms of normal vs defective latent vectors (the paper's Fig. 5), and
where the numbers come from.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hgad.evaluation import EvalResult
from hgad.geometry import to_square
from hgad.io import atomic_write_json, atomic_write_text
from hgad.metrics import METRIC_ORDER
from hgad.thresholds import DECISION_METRICS, decision_counts

__all__ = ["markdown_table", "metrics_payload", "write_reports", "overlay", "colorize", "decision_summary",
           "percent"]

_HEADERS = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "aupro": "AUPRO", "image_ap": "I-AP",
            "pixel_ap": "P-AP", "image_f1max": "I-F1max", "thr_f1": "F1@thr", "thr_recall": "recall@thr",
            "thr_fpr": "FPR@thr", "thr_precision": "prec.@thr", "class_accuracy": "class acc."}
_THR_NOTE = ("@thr: at the run's stored per-class threshold (anomalous when score > threshold); recall@thr = "
             "defects caught, FPR@thr = normal images flagged. I-F1max assumes an oracle threshold per class.")
_DEFECT_NOTE = ("Per defect type: the image AUROC of that type's images against all normal test images of the "
                "class (values in %).")
_THUMB = 128  # px per thumbnail tile
_JPEG_QUALITY = 80


def percent(v: float | None) -> str:
    """A metric in % with one decimal; a dash for a missing or undefined (NaN) one."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _columns(result: EvalResult) -> list[str]:
    cols = list(METRIC_ORDER)
    if result.thresholds is not None:
        cols += list(DECISION_METRICS)
    if any("class_accuracy" in m for m in result.per_class.values()):
        cols.append("class_accuracy")
    return cols


def _mean_row(result: EvalResult) -> dict[str, float]:
    mean = dict(result.mean)
    if result.class_accuracy is not None:
        mean["class_accuracy"] = result.class_accuracy
    return mean


def markdown_table(result: EvalResult) -> str:
    """Per-class rows and the mean, in %, in the paper's column order, then the deployed threshold's columns."""
    cols = _columns(result)
    lines = [f"Protocol `{result.protocol}`, class source `{result.class_source}`, score `{result.score}` "
             "(values in %)", "",
             "| class | " + " | ".join(_HEADERS[c] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, m in result.per_class.items():
        lines.append(f"| {name} | " + " | ".join(percent(m.get(c)) for c in cols) + " |")
    mean = _mean_row(result)
    lines.append("| **mean** | " + " | ".join(f"**{percent(mean.get(c))}**" for c in cols) + " |")
    if result.thresholds is not None:
        lines += ["", _THR_NOTE]
    if result.image_only:
        lines += ["", f"Image labels only (no ground-truth masks, so no pixel metrics): {', '.join(result.image_only)}"]
    header, rows = _defect_rows(result)
    if rows:
        lines += ["", _DEFECT_NOTE, "", "| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _defect_rows(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-defect-type table (recall at the threshold when the run's thresholds apply)."""
    header = ["class", "defect type", "images", "I-AUROC"] + (["recall@thr"] if result.thresholds is not None else [])
    rows = []
    for name, kinds in result.per_defect.items():
        for kind, m in kinds.items():
            row = [name, kind, str(m["n"]), percent(m["image_auroc"])]
            rows.append(row + ([percent(m["thr_recall"])] if result.thresholds is not None else []))
    return header, rows


def decision_summary(result: EvalResult) -> dict[str, dict[str, Any]]:
    """Per class: the deployed threshold(s) and the counts of what it decided on the test images."""
    if result.thresholds is None:
        return {}
    labels = np.array([r.label for r in result.records])
    names = np.array([r.class_name for r in result.records])
    out = {}
    for name in result.per_class:
        sel = names == name
        c = decision_counts(result.scores[sel], labels[sel], result.thresholds[sel])
        used = sorted({float(t) for t in result.thresholds[sel]})
        out[name] = {"threshold": used[0] if len(used) == 1 else used, "defects_caught": c.tp, "defects_missed": c.fn,
                     "false_alarms": c.fp, "normal_passed": c.tn}
    return out


def metrics_payload(result: EvalResult, seconds: float | None = None,
                    provenance: dict[str, Any] | None = None) -> dict:
    """metrics.json's content: settings, per-class and mean metrics (NaN written as null), decisions, provenance."""

    def clean(d: dict) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    return {"protocol": result.protocol, "class_source": result.class_source, "score": result.score,
            "per_class": {k: clean(v) for k, v in result.per_class.items()}, "mean": clean(result.mean),
            "per_defect_type": {c: {k: clean(v) for k, v in kinds.items()} for c, kinds in result.per_defect.items()},
            "class_accuracy": result.class_accuracy, "unseen_classes": result.unseen,
            "image_label_only_classes": result.image_only, "decisions": decision_summary(result),
            "n_images": len(result.records), "seconds": seconds, "provenance": provenance or {}}


def colorize(values: np.ndarray, vmax: float) -> np.ndarray:
    """Map values in [0, vmax] to RGB uint8 with matplotlib's 'jet' colour map."""
    from matplotlib import colormaps

    norm = np.clip(values / vmax, 0, 1) if vmax > 0 else np.zeros_like(values)
    # bytes=True reads the colour table as uint8: the same colours as float RGBA times 255, truncated, without
    # float64 RGBA arrays of 32 bytes a pixel (670 MB for a 4000x3000 map)
    return np.ascontiguousarray(colormaps["jet"](norm, bytes=True)[..., :3])


def overlay(image: Image.Image, amap: np.ndarray, vmax: float, alpha: float = 0.45) -> Image.Image:
    """Colour anomaly map blended over the image (resized to the map when their sizes differ)."""
    base = image.convert("RGB")
    size = (amap.shape[1], amap.shape[0])
    if base.size != size:
        base = base.resize(size, Image.Resampling.LANCZOS)
    return Image.blend(base, Image.fromarray(colorize(amap, vmax)), alpha)


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY, optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _histogram_figure(result: EvalResult):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.histograms)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        groups = result.histograms[name]
        vals = [v for v in groups.values() if len(v)]
        if not vals:
            ax.set_axis_off()
            continue
        lo, hi = np.percentile(np.concatenate(vals), [0.5, 99.9])
        bins = np.linspace(lo, hi, 50)
        for g, colour in (("normal", "tab:blue"), ("anomalous", "tab:red")):
            if len(groups[g]):
                ax.hist(np.clip(groups[g], lo, hi), bins=bins, density=True, alpha=0.55, color=colour,
                        label=f"{g} ({len(groups[g]):,})")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("log-likelihood per dim (finest scale)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig, plt


def _verdict(label: int, score: float, threshold: float | None) -> str:
    if threshold is None:
        return ""
    flagged = score > threshold
    return ("caught" if flagged else "MISSED") if label == 1 else ("FALSE ALARM" if flagged else "passed")


def _strip(result: EvalResult, ex: dict, vmax: float) -> str | None:
    """One example: image · ground truth · anomaly map · overlay, as one JPEG thumbnail strip."""
    rec = ex["record"]
    try:
        with Image.open(rec.path) as im:
            img = to_square(im.convert("RGB"), _THUMB, result.resize, Image.Resampling.LANCZOS)
    except OSError:
        return None
    t = _THUMB
    small = Image.fromarray(ex["map"].astype(np.float32), mode="F").resize((t, t), Image.Resampling.BILINEAR)
    amap = np.asarray(small)
    mask = Image.fromarray((ex["mask"] * 255).astype(np.uint8)).resize((t, t), Image.Resampling.NEAREST)
    tiles = [img, mask.convert("RGB"), Image.fromarray(colorize(amap, vmax)), overlay(img, amap, vmax)]
    strip = Image.new("RGB", (t * 4 + 9, t), "white")
    for k, tile in enumerate(tiles):
        strip.paste(tile, (k * (t + 3), 0))
    thr = None if result.thresholds is None else float(result.thresholds[ex["index"]])
    verdict = _verdict(rec.label, ex["score"], thr)
    kind = "normal" if rec.label == 0 else f"defect: {rec.defect_type}"
    thr_text = "" if thr is None else f" / threshold {thr:.3g}"
    cls = " class='bad'" if verdict in ("MISSED", "FALSE ALARM") else ""
    return (f"<figure{cls}><img src='data:image/jpeg;base64,{_b64(strip)}' width='{4 * t + 9}' height='{t}' "
            f"alt='{html.escape(rec.path.name)}'><figcaption><b>{html.escape(verdict)}</b> "
            f"{html.escape(rec.path.name)} — {html.escape(kind)} — score {ex['score']:.3g}{thr_text}"
            "</figcaption></figure>")


def _examples_html(result: EvalResult) -> str:
    parts = []
    vmax = float(np.percentile(result.scores, 99)) if len(result.scores) else 1.0
    if result.thresholds is not None:  # the colour scale saturates at twice the typical threshold
        vmax = 2 * float(np.median(result.thresholds))
    for name, items in result.examples.items():
        defects = [s for ex in items if ex["record"].label == 1 and (s := _strip(result, ex, vmax))]
        normal = [s for ex in items if ex["record"].label == 0 and (s := _strip(result, ex, vmax))]
        parts.append(f"<h3>{html.escape(name)}</h3>"
                     f"<h4>Defects, worst miss first</h4>{''.join(defects) or '<p>none</p>'}"
                     f"<h4>Normal images, worst false alarm first</h4>{''.join(normal) or '<p>none</p>'}")
    legend = (f"<p class='legend'>Each strip: image (as the model saw it) · ground truth · anomaly map · overlay; "
              f"colour scale 0 to {vmax:.3g}. Defects are ordered by how far their score stays below the "
              "threshold, normal images by how far they go above it.</p>")
    return legend + "".join(parts)


def _table(header: list[str] | None, rows: list[list[str]], row_class: list[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join(f"<tr{(' class=' + repr(row_class[i])) if row_class and row_class[i] else ''}>"
                   + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for i, row in enumerate(rows))
    return f"<table>{head}{body}</table>"


def _decisions_html(result: EvalResult) -> str:
    summary = decision_summary(result)
    if not summary:
        return ("<p>No decision counts: the stored thresholds were calibrated for the run's own score under the "
                "deploy protocol, not for this evaluation.</p>")
    rows = []
    for name, d in summary.items():
        thr = d["threshold"]
        thr_text = f"{thr:.4g}" if isinstance(thr, float) else ", ".join(f"{t:.4g}" for t in thr)
        n_def, n_norm = d["defects_caught"] + d["defects_missed"], d["false_alarms"] + d["normal_passed"]
        rows.append([html.escape(name), thr_text, f"{d['defects_caught']} of {n_def}", str(d["defects_missed"]),
                     f"{d['false_alarms']} of {n_norm}", str(d["normal_passed"])])
    return (_table(["class", "threshold", "defects caught", "defects missed", "false alarms", "normal passed"],
                   rows)
            + "<p class='legend'>An image is anomalous when its score is above the threshold of the class that "
              "scored it (a class's row lists every threshold used on its images).</p>")


def _provenance_html(provenance: dict[str, Any]) -> str:
    rows = [[html.escape(str(k)), html.escape(", ".join(map(str, v)) if isinstance(v, list) else str(v))]
            for k, v in provenance.items()]
    return f"<div class='prov'>{_table(None, rows)}</div>" if rows else ""


def _html(result: EvalResult, provenance: dict[str, Any]) -> str:
    cols = _columns(result)
    rows = [[html.escape(n)] + [percent(m.get(c)) for c in cols] for n, m in result.per_class.items()]
    mean = _mean_row(result)
    rows.append(["mean"] + [percent(mean.get(c)) for c in cols])
    metrics = _table(["class"] + [_HEADERS[c] for c in cols], rows, [""] * (len(rows) - 1) + ["mean"])
    fig, plt = _histogram_figure(result)
    hist = _figure_b64(fig)
    plt.close(fig)
    style = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:6px 0}"
             "td,th{border:1px solid #ccc;padding:3px 9px;text-align:right}td:first-child{text-align:left}"
             "tr.mean{font-weight:bold;background:#eef}figure{display:inline-block;margin:4px}"
             ".prov td{text-align:left;font-size:13px}figure.bad figcaption b{color:#b00}"
             "figcaption{font-size:12px;max-width:530px}"
             ".legend{color:#555;font-size:13px}img{max-width:100%}h4{margin:8px 0 2px}")
    note = f"<p class='legend'>{html.escape(_THR_NOTE)}</p>" if result.thresholds is not None else ""
    header, rows = _defect_rows(result)
    if rows:
        note += (f"<h2>Per defect type</h2><p class='legend'>{html.escape(_DEFECT_NOTE)}</p>"
                 + _table(header, [[html.escape(c) for c in row] for row in rows]))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>hgad report</title><style>{style}</style>"
            f"</head><body><h1>hgad evaluation report</h1>{_provenance_html(provenance)}"
            f"<p>protocol <b>{result.protocol}</b>, class source <b>{result.class_source}</b>, score "
            f"<b>{result.score}</b>, {len(result.records)} test images. Values in %.</p>{metrics}{note}"
            f"<h2>Decisions at the deployed thresholds</h2>{_decisions_html(result)}"
            f"<h2>Examples</h2>{_examples_html(result)}"
            f"<h2>Log-likelihood of normal vs defective latent vectors</h2>"
            f"<p class='legend'>Finest scale; defective = vectors whose cell is mostly inside the ground-truth "
            f"mask. Separated histograms mean the flow maps defects to low likelihood (the paper's Fig. 5).</p>"
            f"<img src='data:image/png;base64,{hist}' alt='log-likelihood histograms'></body></html>")


def write_reports(result: EvalResult, out_dir: Path, *, html: bool = True, seconds: float | None = None,
                  provenance: dict[str, Any] | None = None) -> list[Path]:
    """Write metrics.json, metrics.md, image_scores.csv and (optionally) report.html into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "metrics.json", out_dir / "metrics.md", out_dir / "image_scores.csv"]
    atomic_write_json(paths[0], metrics_payload(result, seconds, provenance))
    atomic_write_text(paths[1], markdown_table(result) + "\n")
    lines = ["path,class,label,defect_type,score,scored_as,threshold,decision"]
    for i, (rec, score, pred) in enumerate(zip(result.records, result.scores, result.predicted)):
        scored_as = result.model_classes[int(pred)] if result.model_classes else int(pred)
        thr, decision = "", ""
        if result.thresholds is not None:
            thr = f"{result.thresholds[i]:.6g}"
            decision = "anomalous" if score > result.thresholds[i] else "normal"
        lines.append(f"{rec.path},{rec.class_name},{rec.label},{rec.defect_type},{score:.6g},{scored_as},{thr},"
                     f"{decision}")
    atomic_write_text(paths[2], "\n".join(lines) + "\n")
    if html:
        paths.append(out_dir / "report.html")
        atomic_write_text(paths[-1], _html(result, provenance or {}))
    return paths
