"""``hgad threshold``: change a run's per-class decision thresholds after training."""

from __future__ import annotations

import argparse
from pathlib import Path

from hgad.errors import ConfigError

__all__ = ["NAME", "add_parser", "run"]

NAME = "threshold"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``threshold`` sub-parser."""
    p = sub.add_parser(
        NAME, help="set a run's per-class decision thresholds after training",
        description="Set the decision threshold of one or more classes of a run (used by predict, test and "
        "export): to a value, or to the one the stored calibration scores give for another target "
        "false-positive rate. model.safetensors and calibration.json are replaced atomically.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder written by hgad train")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help="class to change (repeatable; default: every class)")
    p.add_argument("--value", type=float, help="the new threshold (an image score above it is anomalous)")
    p.add_argument("--target-fpr", type=float, help="recompute for this false-positive rate on the held-out "
                   "calibration images")


def run(args: argparse.Namespace) -> int:
    """Rewrite the thresholds under the run folder's lock and print each change."""
    from hgad.calibration import set_thresholds
    from hgad.checkpoint import read_run_config
    from hgad.io import FolderLock

    read_run_config(args.run_dir)  # a missing run is named before anything is locked
    if args.value is not None and not args.classes:
        raise ConfigError("--class", "required with --value (one value rarely suits every class)")
    with FolderLock(args.run_dir):  # never beside a running `hgad train` of the same folder
        changed = set_thresholds(args.run_dir, args.classes, value=args.value, target_fpr=args.target_fpr)
    for name, (old, new) in changed.items():
        print(f"{name}: threshold {old:.6g} -> {new:.6g}")
    return 0
