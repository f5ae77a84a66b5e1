"""``hgad predict``: score loose image files or folders with a trained run."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from hgad.cli.common import add_device_args, add_weights_arg, apply_threads
from hgad.errors import ConfigError

__all__ = ["NAME", "add_parser", "run"]

NAME = "predict"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``predict`` sub-parser."""
    r = sub.add_parser(NAME, help="score image files or folders (no dataset layout needed)",
                       description="Score images with the deploy protocol. Writes, per image, the anomaly map "
                       "(16-bit PNG whose full scale is the png16_full_scale column of scores.csv, or .npy), "
                       "a colour overlay and a binary mask, all at the image's own size, plus scores.csv.")
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder written by hgad train")
    r.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files or folders")
    r.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    r.add_argument("--threshold", type=float, help="decision threshold (default: the per-class one stored in "
                   "the run: calibrated on held-out images for --target-fpr, or set by 'hgad threshold')")
    r.add_argument("--class", dest="class_name", help="score every image as this class (default: inferred)")
    r.add_argument("--map-format", choices=("png16", "npy"), default="png16", help="anomaly map file format")
    add_device_args(r)
    r.add_argument("--onnx", type=Path, metavar="FILE", help="run this model exported by 'hgad export' with "
                   "onnxruntime instead of the PyTorch weights (needs hgad[onnx]); RUN_DIR must be the run it "
                   "was exported from (checked); --class is not supported")
    r.add_argument("--allow-errors", action="store_true", help="exit 0 even when some images could not be "
                   "scored (they are listed in scores.csv with their error; default: exit 1)")
    add_weights_arg(r)
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Score the images; exit 1 when some could not be scored (unless --allow-errors)."""
    apply_threads(args)
    from hgad.io import check_writable
    from hgad.predict import predict_paths

    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ConfigError("--threshold", f"must be a finite number, got {args.threshold}")
    check_writable(args.out)
    summary = predict_paths(args.run_dir, args.paths, args.out, threshold=args.threshold,
                            class_name=args.class_name, map_format=args.map_format, batch_size=args.batch_size,
                            device=args.device, progress=not args.no_progress, onnx=args.onnx,
                            backbone_weights=args.backbone_weights)
    print(summary)
    if summary.n_bad and not args.allow_errors:
        print(f"hgad predict: error: {summary.n_bad} of {summary.n_files} images could not be scored (their "
              f"errors are in {args.out / 'scores.csv'}; --allow-errors exits 0 anyway)", file=sys.stderr)
        return 1
    return 0
