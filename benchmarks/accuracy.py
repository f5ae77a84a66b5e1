"""Accuracy benchmark: hgad's unified model against per-class and unified Gaussian yardsticks.

One command builds the development datasets (the demo data and ``dev6``, see ``devdata.py``), trains
hgad with a preset on all classes of each at once, tests it under the deploy protocol with the class
inferred, and computes in the same run two reference detectors on frozen features:

* ``gaussian_per_class``: EfficientNet-Lite0 features of stride 8 and 16 (input normalised 0.5/0.5),
  fused at 32x32, 3x3 local average; one Gaussian per class (mean, covariance + 0.01 I); the
  Mahalanobis distance map standardised per position by the training images' mean and std there,
  upsampled to the map size, blurred (sigma 4); image score = map maximum. PaDiM-like, written here
  as a yardstick, not a product feature.
* ``gaussian_unified``: the same with one Gaussian for all classes.

Every detector runs in its own process, so its wall time and peak memory (VmHWM) are its own. Metrics
are hgad's (``hgad.metrics``): per class and mean image AUROC, pixel AUROC, AUPRO (fractions).
hgad trains with ``calibration_split=0`` unless ``--set`` says otherwise: the Gaussian yardsticks fit on
all training images, so hgad's flow does too, and AUROC / AUPRO do not use the decision threshold.

    python benchmarks/accuracy.py                                  # default preset, both datasets
    python benchmarks/accuracy.py --preset paper --device cuda     # on a GPU
    python benchmarks/accuracy.py --datasets demo --set meta_epochs=8 --label longer \\
        --out benchmarks/results/explore/longer.json --skip-baselines      # one exploration row
    python benchmarks/accuracy.py --table benchmarks/results/explore   # Markdown table of such rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DATASETS = ("demo", "dev6")
METHODS = ("hgad", "gaussian_per_class", "gaussian_unified")
_METRICS = ("image_auroc", "pixel_auroc", "aupro")


# hgad's flow fits on every training image, as the yardsticks do (no hold-out for threshold calibration:
# the metrics here are threshold-free); a --set calibration_split=... replaces it
HGAD_DEFAULTS: dict[str, Any] = {"calibration_split": 0}

# ---- datasets ------------------------------------------------------------------------------------
SMOKE_COUNTS = {"n_train": 4, "n_test_good": 2, "n_test_defect": 5}
SMOKE_HGAD = {"img_size": 128, "n_blocks": 1, "pos_dim": 8, "n_intra": 2, "meta_epochs": 1, "sub_epochs": 1,
              "stage1_epochs": 0, "warmup_epochs": 0, "batch_size": 4}


def build_dataset(name: str, work: Path, smoke: bool = False) -> Path:
    """The dataset folder (made once per work folder; both generators are deterministic)."""
    path = work / "data" / (f"{name}-smoke" if smoke else name)
    if (path / "README.txt").is_file():
        return path
    counts = SMOKE_COUNTS if smoke else {}
    if name == "demo":
        from hgad.demo import make_demo_dataset

        make_demo_dataset(path, seed=0, **counts)
    else:
        from devdata import make_dev_dataset

        make_dev_dataset(path, seed=0, **counts)
    return path


# ---- the Gaussian yardsticks -----------------------------------------------------------------------
def _gaussian_features(extractor, records, norm, batch: int = 16):
    import torch
    import torch.nn.functional as F

    from hgad.data import ImageDataset

    ds = ImageDataset(records, 256, 256, norm)
    out, masks = [], []
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(len(ds), start + batch))]
        x = torch.stack([it.image for it in items])
        f8, f16 = extractor(x)
        f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        f = F.avg_pool2d(torch.cat([f8, f16], 1), 3, stride=1, padding=1, count_include_pad=False)
        out.append(f.double())
        masks.append(torch.stack([it.mask[0] for it in items]))
    return torch.cat(out), torch.cat(masks)


class _Gaussian:
    """Mean, inverse covariance and per-position distance statistics of a set of feature maps."""

    def __init__(self, feats) -> None:
        import torch

        n, c, h, w = feats.shape
        x = feats.permute(0, 2, 3, 1).reshape(-1, c)
        self.mean = x.mean(0)
        cov = torch.cov((x - self.mean).T) + 0.01 * torch.eye(c, dtype=x.dtype)
        self.prec = torch.linalg.inv(cov)
        d = self.distance(feats)
        self.pos_mean, self.pos_std = d.mean(0), d.std(0).clamp_min(1e-6)

    def distance(self, feats):
        n, c, h, w = feats.shape
        x = feats.permute(0, 2, 3, 1).reshape(-1, c) - self.mean
        return ((x @ self.prec) * x).sum(1).clamp_min(0).sqrt().view(n, h, w)

    def maps(self, feats, size: int = 256, sigma: float = 4.0):
        import torch.nn.functional as F

        from hgad.scoring import gaussian_blur

        z = (self.distance(feats) - self.pos_mean) / self.pos_std
        up = F.interpolate(z[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur(up, sigma)


def run_gaussian(data: Path, unified: bool) -> dict[str, Any]:
    import torch

    from hgad.backbone import FeatureExtractor
    from hgad.data import discover

    torch.manual_seed(0)
    t0 = time.perf_counter()
    cat = discover([f"mvtec:{data}"])
    ext = FeatureExtractor("tf_efficientnet_lite0", mode="layers", taps=(2, 3))
    train, _ = _gaussian_features(ext, cat.train, ext.norm)
    train_cls = torch.tensor([r.class_index for r in cat.train])
    models = {None: _Gaussian(train)} if unified else {
        c: _Gaussian(train[train_cls == c]) for c in range(len(cat.classes))}
    fit_s = time.perf_counter() - t0
    test, masks = _gaussian_features(ext, cat.test, ext.norm)
    test_cls = torch.tensor([r.class_index for r in cat.test])
    maps = torch.empty(masks.shape)
    for c in range(len(cat.classes)):
        sel = test_cls == c
        if bool(sel.any()):
            maps[sel] = models[None if unified else c].maps(test[sel])
    return _metrics(cat, maps, masks, fit_s, time.perf_counter() - t0 - fit_s)


def _metrics(cat, maps, masks, train_s: float, test_s: float) -> dict[str, Any]:
    import numpy as np

    from hgad.metrics import by_defect_type, image_metrics, pixel_metrics, summarise

    scores = maps.flatten(1).amax(1).numpy()
    labels = np.array([r.label for r in cat.test])
    cls = np.array([r.class_index for r in cat.test])
    types = np.array([r.defect_type for r in cat.test], dtype=object)
    per_class, per_defect = {}, {}
    for c, name in enumerate(cat.classes):
        sel = cls == c
        kinds = by_defect_type(scores[sel], labels[sel], types[sel])
        per_defect[name] = {k: v["image_auroc"] for k, v in kinds.items()}
        m = {k: v for k, v in image_metrics(scores[sel], labels[sel]).items() if k == "image_auroc"}
        if cat.has_masks.get(name):
            m.update({k: v for k, v in pixel_metrics(maps[sel].numpy(), masks[sel].numpy() > 0.5).items()
                      if k in _METRICS})
        per_class[name] = m
    mean = summarise(per_class)
    return {**{k: mean.get(k) for k in _METRICS}, "train_s": round(train_s, 1), "test_s": round(test_s, 1),
            "per_class": per_class, "per_defect_type": per_defect}


# ---- hgad -----------------------------------------------------------------------------------------
def run_hgad(data: Path, run_dir: Path, preset: str | None, overrides: dict[str, Any],
             rescore: list[str]) -> dict[str, Any]:
    import hgad
    from hgad.config import DEFAULT_PRESET
    from hgad.data import discover
    from hgad.evaluation import evaluate

    preset = preset or DEFAULT_PRESET
    t0 = time.perf_counter()
    det = hgad.train([f"mvtec:{data}"], str(run_dir), preset=preset, progress=False, **overrides)
    train_s = time.perf_counter() - t0
    cat = discover([f"mvtec:{data}"])
    t1 = time.perf_counter()
    res = evaluate(det.model, cat, protocol="deploy", class_source="inferred", progress=False)
    test_s = time.perf_counter() - t1
    per_class = {n: {k: m.get(k) for k in _METRICS} for n, m in res.per_class.items()}
    out = {**{k: res.mean.get(k) for k in _METRICS}, "train_s": round(train_s, 1), "test_s": round(test_s, 1),
           "class_accuracy": res.class_accuracy, "per_class": per_class, "preset": preset,
           "per_defect_type": {c: {k: v["image_auroc"] for k, v in kinds.items()}
                               for c, kinds in res.per_defect.items()},
           "config": det.model.cfg.to_dict()}
    variants = {}
    for score in rescore:
        res = evaluate(det.model, cat, protocol="deploy", class_source="inferred", progress=False, score=score)
        variants[score] = {k: res.mean.get(k) for k in _METRICS}
    if variants:
        out["rescored"] = variants
    return out


# ---- driver -----------------------------------------------------------------------------------------
def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    overrides = json.loads(args.overrides)
    if args.worker == "hgad":
        result = run_hgad(args.dataset_path, args.run_dir, args.preset, overrides, args.rescore)
    else:
        result = run_gaussian(args.dataset_path, unified=args.worker == "gaussian_unified")
    result["peak_rss_mib"] = round(_peak_mib(), 1)
    args.result.write_text(json.dumps(result))


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _child(args: argparse.Namespace, method: str, data: Path, run_dir: Path, overrides: dict) -> dict:
    result = run_dir / f"{method}.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--dataset-path", str(data),
           "--run-dir", str(run_dir / "run"), "--result", str(result), "--overrides", json.dumps(overrides)]
    if args.preset:
        cmd += ["--preset", args.preset]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.rescore:
        cmd += ["--rescore", *args.rescore]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(result.read_text())


def _pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def markdown(payload: dict[str, Any]) -> str:
    lines = ["| dataset | detector | image AUROC | pixel AUROC | AUPRO | train s | test s | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, methods in payload["datasets"].items():
        for method, r in methods.items():
            lines.append(f"| {name} | {method} | {_pct(r['image_auroc'])} | {_pct(r['pixel_auroc'])} | "
                         f"{_pct(r['aupro'])} | {r['train_s']:.0f} | {r['test_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    lines += ["", "Per class (image AUROC / pixel AUROC, %):", ""]
    for name, methods in payload["datasets"].items():
        classes = list(next(iter(methods.values()))["per_class"])
        lines += [f"| {name} | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for c in classes:
            cells = [f"{_pct(m['per_class'][c].get('image_auroc'))} / {_pct(m['per_class'][c].get('pixel_auroc'))}"
                     for m in methods.values()]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _defect_table(payload)
    return "\n".join(lines)


def _defect_table(payload: dict[str, Any]) -> list[str]:
    """Image AUROC per class and defect type (that type's images against the class's normal ones)."""
    lines = []
    for name, methods in payload["datasets"].items():
        with_types = {m: r["per_defect_type"] for m, r in methods.items() if "per_defect_type" in r}
        if not with_types:
            continue
        if not lines:
            lines = ["Per defect type (image AUROC of that type's images against the class's normal ones, %):", ""]
        lines += [f"| {name} | defect type | " + " | ".join(with_types) + " |", "|---|---|" + "---:|" * len(with_types)]
        first = next(iter(with_types.values()))
        for c, kinds in first.items():
            for kind in kinds:
                cells = [_pct(t.get(c, {}).get(kind)) for t in with_types.values()]
                lines.append(f"| {c} | {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def targets(payload: dict[str, Any]) -> list[str]:
    """The issue's targets, each with the measured numbers and whether it is met."""
    out = []
    for name, m in payload["datasets"].items():
        if "hgad" not in m or "gaussian_per_class" not in m:
            continue
        h, g = m["hgad"], m["gaussian_per_class"]
        ok_i = h["image_auroc"] >= g["image_auroc"] + 0.05
        ok_p = h["pixel_auroc"] >= g["pixel_auroc"]
        out.append(f"{name}: hgad image AUROC {_pct(h['image_auroc'])} vs per-class Gaussian + 5 = "
                   f"{_pct(g['image_auroc'] + 0.05)}: {'met' if ok_i else 'MISSED'}; pixel AUROC "
                   f"{_pct(h['pixel_auroc'])} vs {_pct(g['pixel_auroc'])}: {'met' if ok_p else 'MISSED'}")
        if name == "demo":
            ok = h["image_auroc"] >= 0.9 and h["pixel_auroc"] >= 0.9
            out.append(f"demo: image / pixel AUROC >= 90: {'met' if ok else 'MISSED'}")
    return out


def _settings(cfg: dict[str, Any]) -> str:
    """The settings that distinguish exploration rows, read from the run's full saved config."""
    taps = ",".join(str(t) for t in cfg["taps"])
    mode = f"pyramid tap {taps}" if cfg["feature_mode"] == "pyramid" else f"layers {taps}"
    extra = [f"{k}={cfg[k]}" for k, default in (("lambda2", 100.0), ("pos_dim", 128), ("batch_size", 8),
                                                  ("n_intra", 10)) if cfg[k] != default]
    return (f"{cfg['backbone'].replace('tf_efficientnet_', '')} {cfg['img_size']}px {mode}, "
            f"pool {cfg.get('feature_pool', 1)}, {_input_transform(cfg)}, "
            f"{cfg['meta_epochs']}x{cfg['sub_epochs']} passes, {cfg.get('score_norm', 'max')} / {cfg['score']}"
            + (", " + ", ".join(extra) if extra else ""))


def _input_transform(cfg: dict[str, Any]) -> str:
    if cfg.get("whiten"):
        return "whitened"
    # rows made before whitening replaced it carry the earlier per-channel standardisation switch
    return "per-channel standardised" if cfg.get("feature_norm") else "raw features"


def table_of(folder: Path) -> str:
    """Markdown table of exploration rows (JSON files written with --out and --label)."""
    rows = []
    for path in sorted(folder.glob("*.json")):
        p = json.loads(path.read_text())
        for name, methods in p["datasets"].items():
            for method, r in methods.items():
                settings = _settings(r["config"]) if "config" in r else "(yardstick)"
                rows.append(f"| {p.get('label') or path.stem} | {name} | {method} | {_pct(r['image_auroc'])} | "
                            f"{_pct(r['pixel_auroc'])} | {_pct(r['aupro'])} | {r['train_s']:.0f} | {settings} |")
                for score, v in r.get("rescored", {}).items():
                    rows.append(f"| {p.get('label') or path.stem} | {name} | … re-scored `{score}` | "
                                f"{_pct(v['image_auroc'])} | {_pct(v['pixel_auroc'])} | {_pct(v['aupro'])} | | |")
    return "\n".join(["| row | dataset | detector | image AUROC | pixel AUROC | AUPRO | train s | settings |",
                      "|---|---|---|---:|---:|---:|---:|---|", *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="hgad preset (default: hgad's default preset)")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {DATASETS}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--skip-baselines", action="store_true", help="hgad only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hgad config override")
    p.add_argument("--rescore", nargs="*", default=[], help="also score the trained model with these --score kinds")
    p.add_argument("--work", type=Path, default=Path("/tmp/hgad-accuracy"), help="datasets and runs")
    p.add_argument("--label", help="name of this row (exploration)")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="hgad --device (default: the preset's)")
    p.add_argument("--out", type=Path, help="results JSON")
    p.add_argument("--md", type=Path, help="also write the Markdown table to this file")
    p.add_argument("--table", type=Path, metavar="DIR", help="print the table of exploration JSONs in DIR and exit")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="combine the datasets of result files written with --out (runs made in parallel)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny datasets and model, to check the script runs (seconds; numbers meaningless)")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--dataset-path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.table:
        print(table_of(args.table))
        return None
    sys.path.insert(0, str(HERE.parent / "src"))
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        payload = {**parts[0], "datasets": {k: v for p_ in parts for k, v in p_["datasets"].items()},
                   "machines": [p_["machine"] for p_ in parts]}
        return _report(args, payload, [p_["machine"]["command"] for p_ in parts])
    from common import machine_info

    overrides = {**HGAD_DEFAULTS, **(SMOKE_HGAD if args.smoke else {}), **_parse_set(args.set)}
    if args.device:
        overrides["device"] = args.device
    methods = ["hgad"] if args.skip_baselines else [m for m in args.methods.split(",") if m]
    payload: dict[str, Any] = {"machine": machine_info(["cuda" if args.device == "cuda" else "cpu"]),
                               "label": args.label, "preset": args.preset, "overrides": overrides,
                               "smoke": args.smoke, "worker_threads": args.threads, "datasets": {}}
    for name in [d for d in args.datasets.split(",") if d]:
        data = build_dataset(name, args.work, args.smoke)
        payload["datasets"][name] = {}
        for method in methods:
            print(f"[{name}] {method} ...", flush=True)
            run_dir = args.work / "runs" / (args.label or "default") / name / method
            r = _child(args, method, data, run_dir, overrides if method == "hgad" else {})
            payload["datasets"][name][method] = r
            print(f"[{name}] {method}: image {_pct(r['image_auroc'])} pixel {_pct(r['pixel_auroc'])} "
                  f"aupro {_pct(r['aupro'])} train {r['train_s']:.0f} s", flush=True)
    return _report(args, payload, [payload["machine"]["command"]])


def _report(args: argparse.Namespace, payload: dict[str, Any], commands: list[str]) -> None:
    """Print the table and the targets; write --out (JSON) and --md (the table with the commands)."""
    table = markdown(payload)
    print(table)
    for line in targets(payload):
        print(line)
    if args.out:
        from hgad.io import atomic_write_json

        atomic_write_json(args.out, payload)
    if args.md:
        from hgad.io import atomic_write_text

        machines = payload.get("machines", [payload["machine"]])
        threads = payload.get("worker_threads") or "torch's default"
        head = "\n".join(f"    python benchmarks/{c}" for c in commands)
        where = "; ".join(f"{m['cpu']}, {m['cpu_cores_usable']} cores, torch threads per detector {threads}, load "
                          f"average at start {m['load_average_1min_at_start']}, {m['date']}" for m in machines)
        atomic_write_text(args.md, f"Commands:\n\n{head}\n\nMachine: {where}\n\n" + table + "\n"
                          + "\n".join(f"- {t}" for t in targets(payload)) + "\n")


if __name__ == "__main__":
    main()
