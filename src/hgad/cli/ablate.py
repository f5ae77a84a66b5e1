"""``hgad ablate``: train and test the component ladder (see :mod:`hgad.ablate`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hgad.cli.common import add_dataset_args, add_settings_args, csv_list, resolve_config
from hgad.errors import ConfigError

__all__ = ["NAME", "add_parser", "run"]

NAME = "ablate"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``ablate`` sub-parser."""
    p = sub.add_parser(
        NAME, help="train and test the component ladder (NF baseline -> full HGAD) on one dataset",
        description="Train and test, with the same data, seed and schedule: 1 the unified NF baseline (single "
        "N(0, I) prior), 2 + inter-class Gaussian mixture, 3 + mutual-information loss, 4 + entropy loss, 5 + "
        "intra-class centres (full HGAD). Each rung is a run folder OUT/<n-name>/; finished rungs are skipped "
        "when the command is run again. Scoring: deploy protocol, ground-truth class for every rung. Writes "
        "OUT/ablation.md, ablation.json and ablation.png (log-likelihood histograms, baseline vs HGAD). The "
        "ladder sets --prior, --mi and --entropy-loss itself, and --intra-centers 1 below the full rung.")
    add_dataset_args(p, required=True,
                     help="dataset as KIND:PATH (mvtec, visa, btad, mvtec3d, folder); repeat to use several")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="ablation folder (one run folder per rung)")
    p.add_argument("--report", action="store_true", help="also write report.html for every rung's test")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_settings_args(p, "settings shared by every rung: fast (default) or paper")


def run(args: argparse.Namespace) -> int:
    """Run the ladder and print its table."""
    from hgad.ablate import LADDER_FLAGS, ablation_markdown, run_ablation
    from hgad.io import check_writable

    given = [flag for name, flag in LADDER_FLAGS.items() if hasattr(args, name)]
    if given:
        raise ConfigError(given[0], "is set by the ablation ladder for each rung; leave it out")
    base = resolve_config(args)
    check_writable(args.out)
    t0 = time.perf_counter()
    payload = run_ablation(args.data, args.out, base, classes=csv_list(args.classes),
                           progress=not args.no_progress, html=args.report)
    print(ablation_markdown(payload))
    print(f"ablation finished in {time.perf_counter() - t0:.0f} s; written: "
          + ", ".join(str(args.out / n) for n in ("ablation.md", "ablation.json", "ablation.png")))
    return 0
