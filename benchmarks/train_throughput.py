"""Training throughput of hgad: seconds per pass, vectors/s, images/s and peak memory.

Runs ``hgad.training.fit`` itself (the loop ``hgad train`` uses: feature cache, one summed loss and
one Adam step per batch, finiteness checks, a checkpoint per pass) for a few passes over the data
and reads the per-pass times from its ``train_log.jsonl``. Measured for the ``fast`` preset on the
demo dataset (160 images, 256 px) and for the ``paper`` preset on a dozen demo images (upscaled to
``--paper-img-size``; the EfficientNet-B6 backbone has no offline weights, so it runs with random
weights, which changes no timing), each with the in-memory feature cache and without a cache
(``--cache none``: images decoded and the backbone run at every step, as the release does).

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput-cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import (
    SMOKE_NOTE,
    MemoryMeter,
    add_common_args,
    demo_data,
    finish,
    machine_info,
    markdown_table,
    setup,
    spread,
)
from hgad.config import HGADConfig, preset
from hgad.data import ImageRecord, discover
from hgad.model import HGAD
from hgad.training import LOG_FILE, SUMMARY_FILE, fit

__all__ = ["measure", "main"]

_SMOKE = {"img_size": 64, "pyramid_levels": 2, "n_blocks": 1, "pos_dim": 16, "n_intra": 2, "batch_size": 4,
          "map_size": 32, "blur_sigma": 1.0}
COLUMNS = ["preset", "device", "cache", "images", "img px", "vectors/img", "cache build s", "first pass s",
           "pass s", "vectors/s", "images/s", "peak MiB"]


def measure(cfg: HGADConfig, records: list[ImageRecord], classes: list[str], device: torch.device,
            passes: int, *, cpu_bf16: bool = False) -> dict[str, Any]:
    """Train ``passes`` passes with ``fit``; times of the first and the last pass, peak memory."""
    cfg = dataclasses.replace(cfg, meta_epochs=1, sub_epochs=passes, stage1_epochs=0, warmup_epochs=0,
                              device=device.type)
    cfg.validate()
    meter = MemoryMeter(device)
    meter.reset()
    model = HGAD(cfg, classes).to(device)
    if cpu_bf16:  # experiment: the flows under bf16 autocast on the CPU (the model does this on CUDA only)
        model._autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="hgad-bench-") as tmp:
        start = time.perf_counter()
        fit(model, records, Path(tmp), progress=False, log=lambda *_: None)
        total = time.perf_counter() - start
        log = [json.loads(line) for line in (Path(tmp) / LOG_FILE).read_text().splitlines() if line.strip()]
        summary = json.loads((Path(tmp) / SUMMARY_FILE).read_text())
    last = log[-1]
    shapes = model.backbone.scale_shapes(cfg.img_size)
    return {
        "preset": "", "device": device.type, "cache": cfg.cache + (" +cpu-bf16" if cpu_bf16 else ""),
        "images": len(records), "img px": cfg.img_size, "vectors/img": sum(h * w for h, w in shapes),
        "cache build s": summary["seconds_features"] if cfg.cache != "none" else None,
        "first pass s": log[0]["seconds"], "pass s": last["seconds"], "vectors/s": last["vectors_per_s"],
        "images/s": (len(records) // cfg.batch_size) * cfg.batch_size / last["seconds"],
        "peak MiB": meter.peak_mib(), "memory measure": meter.label, "passes": passes, "seconds_total": total,
        "stage": 2, "batch_size": cfg.batch_size, "backbone": cfg.backbone,
        "backbone_weights": cfg.backbone_weights or "shipped", "n_blocks": cfg.n_blocks, "pos_dim": cfg.pos_dim,
        "per_pass_seconds": [r["seconds"] for r in log],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--presets", nargs="+", default=["fast", "paper"], choices=("fast", "paper"))
    parser.add_argument("--caches", nargs="+", default=["memory", "none"], choices=("memory", "none"),
                        help="feature cache modes to measure (memory: warm in-memory cache; none: recompute)")
    parser.add_argument("--passes", type=int, default=2,
                        help="passes per measurement with the cache; the table reports the last one (default 2)")
    parser.add_argument("--passes-no-cache", type=int, default=1,
                        help="passes per measurement without the cache (default 1: the backbone dominates)")
    parser.add_argument("--fast-images", type=int, default=None,
                        help="training images for the fast preset (default: all 160 demo images)")
    parser.add_argument("--paper-images", type=int, default=16, help="training images for the paper preset")
    parser.add_argument("--paper-img-size", type=int, default=512,
                        help="input size for the paper preset (the paper uses 1024; default 512 to keep it short)")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="also measure fast/memory on CPU with the flows under bf16 autocast (experiment)")
    args = parser.parse_args(argv)
    setup(parser, args)
    machine = machine_info(args.device)
    data = demo_data(args.data)
    catalog = discover([f"mvtec:{data}"], need_test=False)
    rows = []
    for name in args.presets:
        if name == "fast":
            cfg = preset("fast", **(_SMOKE if args.smoke else {}))
            records = spread(catalog.train, 8 if args.smoke else (args.fast_images or len(catalog.train)))
        else:
            size = 64 if args.smoke else args.paper_img_size
            cfg = preset("paper", backbone_weights="none",
                         **{**(_SMOKE if args.smoke else {}), "img_size": size})
            records = spread(catalog.train, 8 if args.smoke else args.paper_images)
        for device_name in args.device:
            device = torch.device(device_name)
            variants = [(c, False) for c in args.caches]
            if args.cpu_bf16 and device.type == "cpu" and name == "fast":
                variants.append(("memory", True))
            for cache, bf16 in variants:
                passes = 1 if args.smoke else args.passes if cache != "none" else args.passes_no_cache
                print(f"{name} preset, {device_name}, cache {cache}{' +cpu-bf16' if bf16 else ''}: "
                      f"{len(records)} images at {cfg.img_size} px, {passes} passes ...", flush=True)
                row = measure(dataclasses.replace(cfg, cache=cache), records, catalog.classes, device, passes,
                              cpu_bf16=bf16)
                row["preset"] = name
                rows.append(row)
    notes = [
        "pass s / vectors/s / images/s: the last of the passes (stage-2 loss, all terms), from fit()'s "
        "train_log.jsonl; first pass s includes one-time warm-up (one pass only without the cache); "
        "cache build s = computing the feature cache (decode + backbone, once per run)",
        "paper preset: EfficientNet-B6 with random weights (backbone_weights='none': no offline weights ship; "
        "timings do not depend on the weights), demo images upscaled to the img px shown",
        "cache none: every step decodes its images and runs the backbone on every pyramid level",
    ]
    if args.smoke:
        notes.insert(0, SMOKE_NOTE)
    payload = {"benchmark": "train_throughput", "machine": machine, "results": rows,
               "data": str(data)}
    finish(payload, markdown_table(rows, COLUMNS), args.out, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
