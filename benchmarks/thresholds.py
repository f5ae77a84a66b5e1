"""Defects caught and false alarms at the deployed threshold: the old rule against held-out calibration (issue 15).

Both rules are read from one run, so the flow and the test images are the same: *before* is hgad 0.1's
rule, the ``--threshold-quantile`` (0.99) of the training images' scores, which ``calibration.json``
keeps per class; *after* is the threshold stored in the model, chosen on the held-out calibration
images for the run's ``--target-fpr``. Test images are scored once (deploy protocol, inferred class;
each image is decided by the threshold of the class that scored it).

    python benchmarks/thresholds.py --run runs/demo --out benchmarks/results/thresholds-demo.json
    python benchmarks/thresholds.py --train runs/t --data mvtec:demo_data -- --img-size 256   # train first
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import finish, machine_info, markdown_table


def _rule_rows(names: list[str], classes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
               thresholds: np.ndarray, rule: str) -> list[dict]:
    from hgad.thresholds import decision_counts

    rows = []
    for name in [*names, "all"]:
        sel = np.ones(len(labels), bool) if name == "all" else classes == name
        c = decision_counts(scores[sel], labels[sel], thresholds[sel])
        rows.append({"rule": rule, "class": name, "defects caught": f"{c.tp} of {c.tp + c.fn}",
                     "recall %": 100 * c.recall, "false alarms": f"{c.fp} of {c.fp + c.tn}", "FPR %": 100 * c.fpr,
                     "precision %": 100 * c.precision, "F1 %": 100 * c.f1})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a run trained with a calibration split")
    p.add_argument("--train", type=Path, metavar="RUN", help="train this run first (hgad train --out RUN --data ...; "
                   "flags after -- go to hgad train)")
    p.add_argument("--data", action="append", help="KIND:PATH of the test data (default: the run's training data)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args, train_flags = p.parse_known_args(argv)
    train_flags = [f for f in train_flags if f != "--"]
    if args.threads:
        torch.set_num_threads(args.threads)
    from hgad.calibration import load_calibration
    from hgad.checkpoint import load_model, read_run_config
    from hgad.cli import main as hgad
    from hgad.data import discover
    from hgad.evaluation import evaluate

    if args.train:
        if not args.data:
            p.error("--train needs --data")
        flags = [f for d in args.data for f in ("--data", d)]
        if hgad(["train", "--out", str(args.train), "--overwrite", "--no-progress", *flags, *train_flags]) != 0:
            return 2
    run = args.run or args.train
    if run is None:
        p.error("give --run or --train")
    cal = load_calibration(run)
    if cal is None or not any(c.scores for c in cal.classes.values()):
        print(f"{run}: no calibration images (trained before hgad kept them, or with --calibration-split 0)",
              file=sys.stderr)
        return 2
    saved = read_run_config(run)
    model = load_model(run)
    catalog = discover(args.data or saved["data"], saved["class_names"], need_train=False)
    t0 = time.perf_counter()
    result = evaluate(model, catalog, progress=False)
    labels = np.array([r.label for r in result.records])
    classes = np.array([r.class_name for r in result.records])
    scored_as = [model.class_names[int(c)] for c in result.predicted]
    before = np.array([cal.classes[n].quantile_threshold for n in scored_as], dtype=np.float64)
    after = model.threshold.double().numpy()[result.predicted]
    rows = (_rule_rows(list(result.per_class), classes, labels, result.scores, before,
                       f"before: {model.cfg.threshold_quantile:g} quantile of training scores")
            + _rule_rows(list(result.per_class), classes, labels, result.scores, after,
                         f"after: calibration images at target FPR {cal.target_fpr:g}"))
    n_cal = {n: len(c.scores) for n, c in cal.classes.items()}
    payload = {"machine": machine_info(["cpu"]), "run": str(Path(run).resolve()), "data": args.data or saved["data"],
               "config": model.cfg.to_dict(), "calibration_images": n_cal, "rows": rows,
               "seconds_test": round(time.perf_counter() - t0, 1)}
    notes = [f"run {run}: resize {model.cfg.resize}, img_size {model.cfg.img_size}, calibration split "
             f"{model.cfg.calibration_split:g} ({', '.join(f'{n} {k}' for n, k in n_cal.items())} images)",
             "both rules on the same flow and test images; an image is decided by the threshold of the class "
             "that scored it"]
    finish(payload, markdown_table(rows, ["rule", "class", "defects caught", "recall %", "false alarms", "FPR %",
                                          "precision %", "F1 %"]), args.out, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
