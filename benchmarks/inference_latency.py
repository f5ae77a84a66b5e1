"""Inference speed of ``Detector.predict``: single-image latency (with a breakdown) and batched throughput.

The model is the ``fast`` preset (shipped EfficientNet-lite0 weights, 384 px, memory bank) with untrained flows,
calibrated on a few demo images so that it has deploy statistics (latency does not depend on the
weights' values); pass ``--run DIR`` to time a trained run folder instead. Inputs are demo test
images already decoded into PIL images, so the time covers preprocessing (resize, crop,
normalisation), the backbone on every pyramid level, the flows, the class posterior, both maps,
upsampling and blur: everything ``hgad predict`` does after reading the file.

    python benchmarks/inference_latency.py --out benchmarks/results/inference_latency-cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from common import (
    SMOKE_NOTE,
    add_common_args,
    demo_data,
    finish,
    machine_info,
    markdown_table,
    median_p90,
    setup,
    spread,
    timed,
)
from hgad.api import Detector
from hgad.config import preset
from hgad.data import discover
from hgad.model import HGAD
from hgad.training import FeatureStore, calibrate

__all__ = ["build_detector", "measure", "main"]

_SMOKE = {"img_size": 64, "pyramid_levels": 2, "n_blocks": 1, "pos_dim": 16, "n_intra": 2, "map_size": 32,
          "blur_sigma": 1.0}
COLUMNS = ["device", "batch", "median s", "p90 s", "images/s", "preprocess s", "backbone s", "flows+prior s",
           "maps s"]


def build_detector(data: Path, device: torch.device, run: Path | None, smoke: bool) -> Detector:
    """A detector with deploy statistics: the run folder's, or an untrained fast-preset model's."""
    if run is not None:
        return Detector.load(run, device.type)
    catalog = discover([f"mvtec:{data}"], need_test=False)
    cfg = preset("fast", device=device.type, **(_SMOKE if smoke else {}))
    model = HGAD(cfg, catalog.classes).to(device).eval()
    records = spread(catalog.train, 4 if smoke else 16)
    store = FeatureStore(model, records, cfg, progress=False)
    calibrate(model, store, torch.tensor([r.class_index for r in records]), progress=False)
    return Detector(model)


def _stage_times(det: Detector, image: Image.Image, device: torch.device) -> dict[str, float]:
    """One single-image prediction split into its stages (seconds)."""
    model = det.model
    t_pre, x = timed(lambda: det.preprocess(image)[None], device)
    with torch.no_grad():
        t_bb, feats = timed(lambda: model.extract(x), device)
        t_flow, lm = timed(lambda: model.latent_maps(feats, None), device)
        t_maps, _ = timed(lambda: model.score_latent(lm, score=model.score_kind(), norm=model.deploy_norm()).maps.cpu(),
                          device)
    return {"preprocess s": t_pre, "backbone s": t_bb, "flows+prior s": t_flow, "maps s": t_maps}


def measure(det: Detector, images: list[Image.Image], device: torch.device, batches: list[int],
            runs: int, warmup: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(warmup):
        det.predict(images[0])
    stages: dict[str, list[float]] = {}
    for i in range(runs):
        for k, v in _stage_times(det, images[i % len(images)], device).items():
            stages.setdefault(k, []).append(v)
    for batch in batches:
        chunk = [images[i % len(images)] for i in range(batch)]
        det.predict(chunk)  # warm-up at this batch size
        times = [timed(lambda c=chunk: det.predict(c), device)[0] for _ in range(runs if batch == 1 else
                                                                                  max(3, runs // 4))]
        med, p90 = median_p90(times)
        row = {"device": device.type, "batch": batch, "median s": med, "p90 s": p90, "images/s": batch / med,
               "runs": len(times), "img_size": det.model.cfg.img_size}
        if batch == 1:
            row.update({k: median_p90(v)[0] for k, v in stages.items()})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--run", type=Path, default=None, help="time this trained run folder instead")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16], help="batch sizes (default 1 8 16)")
    parser.add_argument("--runs", type=int, default=20, help="timed single-image predictions (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed predictions first (default 3)")
    args = parser.parse_args(argv)
    setup(parser, args)
    machine = machine_info(args.device)
    data = demo_data(args.data)
    catalog = discover([f"mvtec:{data}"], need_train=False)
    test = spread(catalog.test, 4 if args.smoke else 16)
    images = [Image.open(r.path).convert("RGB") for r in test]
    batches = [1, 2] if args.smoke else args.batches
    runs, warmup = (2, 1) if args.smoke else (args.runs, args.warmup)
    rows = []
    for device_name in args.device:
        device = torch.device(device_name)
        print(f"{device_name}: building and calibrating the model ...", flush=True)
        det = build_detector(data, device, args.run, args.smoke)
        print(f"{device_name}: timing predict ...", flush=True)
        rows += measure(det, images, device, batches, runs, warmup)
    cfg = dataclasses.asdict(det.model.cfg)
    notes = [
        f"Detector.predict on PIL images of {images[0].size[0]} px (decoded before timing), "
        f"img_size {cfg['img_size']}, map_size {cfg['map_size']}, {cfg['pyramid_levels']} pyramid levels, "
        f"{cfg['n_blocks']} blocks, inferred class, deploy protocol; "
        + ("trained run " + str(args.run) if args.run else "untrained flows, calibrated on a few demo training images"),
        f"batch 1: median and 90th percentile of {runs} predictions after {warmup} warm-up ones; stage columns "
        "are medians of separately timed stages of the same work",
    ]
    if args.smoke:
        notes.insert(0, SMOKE_NOTE)
    payload = {"benchmark": "inference_latency", "machine": machine, "results": rows,
               "config": cfg}
    finish(payload, markdown_table(rows, COLUMNS), args.out, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
