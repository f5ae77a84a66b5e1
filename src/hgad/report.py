"""Evaluation reports: ``metrics.json``, a Markdown table and a self-contained ``report.html``.

The HTML embeds its figures as base64 PNGs so it can be mailed or archived as one file: the metric
table, per-class log-likelihood histograms of normal vs defective latent vectors (as the paper's
Fig. 5), and examples with ground truth, anomaly map and overlay.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from hgad.inference import EvalResult
from hgad.io import atomic_write_json, atomic_write_text
from hgad.metrics import METRIC_ORDER

__all__ = ["markdown_table", "metrics_payload", "write_reports", "overlay", "colorize"]

_HEADERS = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "aupro": "AUPRO", "image_ap": "I-AP",
            "pixel_ap": "P-AP", "image_f1max": "I-F1max", "class_accuracy": "class acc."}


def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _columns(result: EvalResult) -> list[str]:
    cols = list(METRIC_ORDER)
    if any("class_accuracy" in m for m in result.per_class.values()):
        cols.append("class_accuracy")
    return cols


def markdown_table(result: EvalResult) -> str:
    """Per-class rows and the mean, in %, in the paper's column order (image AUROC, pixel AUROC first)."""
    cols = _columns(result)
    lines = [f"Protocol `{result.protocol}`, class source `{result.class_source}`, score `{result.score}` "
             "(values in %)", "",
             "| class | " + " | ".join(_HEADERS[c] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, m in result.per_class.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    mean = dict(result.mean)
    if "class_accuracy" in cols and result.class_accuracy is not None:
        mean["class_accuracy"] = result.class_accuracy
    lines.append("| **mean** | " + " | ".join(f"**{_fmt(mean.get(c))}**" for c in cols) + " |")
    if result.image_only:
        lines += ["", f"Image labels only (no ground-truth masks, so no pixel metrics): {', '.join(result.image_only)}"]
    return "\n".join(lines)


def metrics_payload(result: EvalResult, seconds: float | None = None) -> dict:
    def clean(d: dict) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    return {"protocol": result.protocol, "class_source": result.class_source, "score": result.score,
            "per_class": {k: clean(v) for k, v in result.per_class.items()}, "mean": clean(result.mean),
            "class_accuracy": result.class_accuracy, "unseen_classes": result.unseen,
            "image_label_only_classes": result.image_only,
            "n_images": len(result.records), "seconds": seconds}


def colorize(values: np.ndarray, vmax: float) -> np.ndarray:
    """Map values in [0, vmax] to RGB uint8 with matplotlib's 'jet' colour map."""
    from matplotlib import colormaps

    norm = np.clip(values / vmax, 0, 1) if vmax > 0 else np.zeros_like(values)
    return (colormaps["jet"](norm)[..., :3] * 255).astype(np.uint8)


def overlay(image: Image.Image, amap: np.ndarray, vmax: float, alpha: float = 0.45) -> Image.Image:
    """Colour anomaly map blended over the image, resized (shorter side + centre crop) to the map."""
    size = amap.shape[0]
    base = _square(image.convert("RGB"), size)
    heat = Image.fromarray(colorize(amap, vmax))
    return Image.blend(base, heat, alpha)


def _square(image: Image.Image, size: int) -> Image.Image:
    from hgad.geometry import resize_crop

    return resize_crop(image, size, Image.Resampling.LANCZOS)


def _png_b64(fig_or_image) -> str:
    buf = io.BytesIO()
    if isinstance(fig_or_image, Image.Image):
        fig_or_image.save(buf, format="PNG")
    else:
        fig_or_image.savefig(buf, format="png", dpi=90, bbox_inches="tight")
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


def _examples_html(result: EvalResult) -> str:
    parts = []
    all_scores = result.scores
    vmax = float(np.percentile(all_scores, 99)) if len(all_scores) else 1.0
    for name, items in result.examples.items():
        cells = []
        for ex in items:
            rec = ex["record"]
            try:
                with Image.open(rec.path) as im:
                    img = im.convert("RGB")
            except OSError:
                continue
            size = ex["map"].shape[0]
            tiles = [_square(img, size), Image.fromarray((ex["mask"] * 255).astype(np.uint8)).convert("RGB"),
                     Image.fromarray(colorize(ex["map"], vmax)), overlay(img, ex["map"], vmax)]
            strip = Image.new("RGB", (size * 4 + 12, size), "white")
            for k, tile in enumerate(tiles):
                strip.paste(tile, (k * (size + 4), 0))
            kind = "normal" if rec.label == 0 else f"defect: {rec.defect_type}"
            cells.append(f"<figure><img src='data:image/png;base64,{_png_b64(strip)}' width='{2 * size}'>"
                         f"<figcaption>{html.escape(rec.path.name)} — {html.escape(kind)} — score "
                         f"{ex['score']:.3g}</figcaption></figure>")
        parts.append(f"<h3>{html.escape(name)}</h3><p class='legend'>image · ground truth · anomaly map · "
                     f"overlay (colour scale 0 to {vmax:.3g}, the 99th percentile of image scores)</p>"
                     + "".join(cells))
    return "".join(parts)


def _html(result: EvalResult) -> str:
    cols = _columns(result)
    head = "".join(f"<th>{_HEADERS[c]}</th>" for c in cols)
    rows = "".join(f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{_fmt(m.get(c))}</td>" for c in cols)
                   + "</tr>" for n, m in result.per_class.items())
    mean = dict(result.mean)
    if result.class_accuracy is not None:
        mean["class_accuracy"] = result.class_accuracy
    rows += "<tr class='mean'><td>mean</td>" + "".join(f"<td>{_fmt(mean.get(c))}</td>" for c in cols) + "</tr>"
    fig, plt = _histogram_figure(result)
    hist = _png_b64(fig)
    plt.close(fig)
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}td:first-child{text-align:left}"
             "tr.mean{font-weight:bold;background:#eef}figure{display:inline-block;margin:6px}"
             "figcaption{font-size:12px}.legend{color:#555;font-size:13px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>hgad report</title><style>{style}</style>"
            f"</head><body><h1>hgad evaluation report</h1><p>protocol <b>{result.protocol}</b>, class source "
            f"<b>{result.class_source}</b>, {len(result.records)} test images. Values in %.</p>"
            f"<table><tr><th>class</th>{head}</tr>{rows}</table>"
            f"<h2>Log-likelihood of normal vs defective latent vectors</h2>"
            f"<p class='legend'>Finest scale; defective = vectors whose cell is mostly inside the ground-truth "
            f"mask. Separated histograms mean the flow maps defects to low likelihood.</p>"
            f"<img src='data:image/png;base64,{hist}'>"
            f"<h2>Examples</h2>{_examples_html(result)}</body></html>")


def write_reports(result: EvalResult, out_dir: Path, *, html: bool = True, seconds: float | None = None
                  ) -> list[Path]:
    """Write metrics.json, metrics.md, scores.csv and (optionally) report.html into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "metrics.json", out_dir / "metrics.md", out_dir / "image_scores.csv"]
    atomic_write_json(paths[0], metrics_payload(result, seconds))
    atomic_write_text(paths[1], markdown_table(result) + "\n")
    lines = ["path,class,label,defect_type,score,scored_as"]
    for rec, score, pred in zip(result.records, result.scores, result.predicted):
        scored_as = result.model_classes[int(pred)] if result.model_classes else int(pred)
        lines.append(f"{rec.path},{rec.class_name},{rec.label},{rec.defect_type},{score:.6g},{scored_as}")
    atomic_write_text(paths[2], "\n".join(lines) + "\n")
    if html:
        paths.append(out_dir / "report.html")
        atomic_write_text(paths[-1], _html(result))
    return paths
