"""``hgad info``: describe a run folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from hgad.cli.common import add_weights_arg, load_run_model

__all__ = ["NAME", "add_parser", "run"]

NAME = "info"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``info`` sub-parser."""
    i = sub.add_parser(NAME, help="describe a run folder", description="Print a run's settings, classes "
                       "and parameter counts.")
    i.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder written by hgad train")
    add_weights_arg(i)


def run(args: argparse.Namespace) -> int:
    """Print the run's classes, backbone, parameter counts and settings."""
    model = load_run_model(args.run_dir, "cpu", args.backbone_weights)
    cfg = model.cfg
    print(f"run {args.run_dir}: {model.n_classes} classes: {', '.join(model.class_names)}")
    print(f"backbone {cfg.backbone} {cfg.feature_mode} taps {list(cfg.taps)} dims {model.backbone.feature_dims}")
    print("trainable parameters per flow: " + ", ".join(f"{c:,}" for c in model.flow_parameter_counts()))
    print(f"deploy statistics stored: {bool(model.calibrated)}")
    print(cfg.to_json())
    return 0
