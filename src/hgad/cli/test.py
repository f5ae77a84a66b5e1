"""``hgad test``: evaluate a run on a dataset's test split and write the reports."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hgad.cli.common import DATA_HELP, add_device_args, add_weights_arg, apply_threads, csv_list, load_run_model
from hgad.config import CHOICES
from hgad.errors import ConfigError, InputError

__all__ = ["NAME", "add_parser", "run", "REPORT_ENTRIES"]

NAME = "test"
REPORT_ENTRIES = frozenset({"metrics.json", "metrics.md", "image_scores.csv", "report.html"})


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``test`` sub-parser."""
    e = sub.add_parser(NAME, help="evaluate a run on a dataset's test split",
                       description="Score the test images, compute image/pixel AUROC, AUPRO, AP and F1-max per "
                       "class (and image AUROC per defect type), and write metrics.json, metrics.md, "
                       "image_scores.csv and report.html.")
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder written by hgad train")
    e.add_argument("--data", action="append", metavar="KIND:PATH",
                   help=DATA_HELP + " (default: the training data of the run)")
    e.add_argument("--classes", help="comma-separated subset of classes")
    e.add_argument("--protocol", choices=("deploy", "paper"), default="deploy",
                   help="deploy: statistics stored at training, each image scored alone (default); "
                   "paper: the release's normalisation by each class's whole test set")
    e.add_argument("--class-source", choices=("inferred", "known"), default="inferred",
                   help="class used to score an image: inferred from the latent posterior (default) or the "
                   "ground truth (paper)")
    e.add_argument("--score", choices=CHOICES["score"], help="re-score with this pixel score without retraining: "
                   "product of the log-likelihood and entropy maps, logp only, entropy only, or (runs trained with "
                   "the class Gaussians of the latents / a memory bank) mahalanobis, knn or their sum "
                   "mahalanobis+knn (default: the run's; with one class product means logp; summed over the "
                   "run's --score-scales finest scales)")
    e.add_argument("--score-scales", type=int, metavar="N",
                   help="re-score summing the maps of the N finest scales (0: all) instead of the run's "
                   "--score-scales (deploy protocol, runs trained with --score-norm zscore); the run's decision "
                   "thresholds apply only to its own number")
    e.add_argument("--out", type=Path, help="report folder (default: RUN_DIR/test-PROTOCOL-CLASSSOURCE, "
                   "with -score-SCORE and -scales-N appended when --score or --score-scales is given)")
    add_device_args(e)
    e.add_argument("--no-report", action="store_true", help="skip report.html")
    add_weights_arg(e)
    e.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the metrics table and write metrics.json, metrics.md, image_scores.csv, report.html."""
    apply_threads(args)
    from hgad import distributed
    from hgad.checkpoint import CONFIG_FILE, MODEL_FILE, read_run_config
    from hgad.data import discover
    from hgad.device import resolve_device
    from hgad.evaluation import evaluate
    from hgad.io import check_output_folder, check_writable, whole_folder
    from hgad.report import markdown_table, write_reports
    from hgad.review import test_provenance

    saved = read_run_config(args.run_dir)
    data = args.data or saved.get("data")
    if not data:
        raise ConfigError("--data", "required (the run does not record its training data)")
    suffix = (f"-score-{args.score}" if args.score else "") + \
        (f"-scales-{args.score_scales}" if args.score_scales is not None else "")
    out = args.out or args.run_dir / f"test-{args.protocol}-{args.class_source}{suffix}"
    check_writable(out)
    check_output_folder(out, REPORT_ENTRIES, "hgad test report")
    device = resolve_device(args.device)
    ctx = distributed.init(device)  # under torchrun the test images are shared out; rank 0 reports
    main = ctx is None or ctx.is_main
    try:
        # a run trained on some classes is tested on those unless other data or classes are asked for
        classes = csv_list(args.classes) or (None if args.data else saved.get("class_names"))
        catalog = discover(data, classes, need_train=False)  # cheap checks first: fail before loading
    except InputError as err:
        if not args.data:
            raise InputError(err.path, f"{err.problem} (dataset path from {args.run_dir / CONFIG_FILE}; give "
                                       "--data if the data moved)") from None
        raise
    model = load_run_model(args.run_dir, device, args.backbone_weights)
    t0 = time.perf_counter()
    try:
        result = evaluate(model, catalog, protocol=args.protocol, class_source=args.class_source,
                          batch_size=args.batch_size, progress=main and not args.no_progress,
                          num_workers=model.cfg.num_workers, score=args.score, score_scales=args.score_scales)
    except InputError as err:
        if err.path != "model":
            raise
        raise InputError(args.run_dir / MODEL_FILE, err.problem) from None
    seconds = time.perf_counter() - t0
    if not main:
        return 0
    for warning in result.warnings:
        print(f"hgad test: warning: {warning}", file=sys.stderr)
    score = result.score if args.score_scales is None else \
        f"{result.score}, summed over {args.score_scales or 'all'} finest scale(s)"
    provenance = test_provenance(args.run_dir, saved, data, args.protocol, args.class_source, score)
    with whole_folder(out) as work:  # the report folder is replaced as a whole: never new metrics beside an old report
        write_reports(result, work, html=not args.no_report, seconds=seconds, provenance=provenance)
    names = ["metrics.json", "metrics.md", "image_scores.csv"] + ([] if args.no_report else ["report.html"])
    print(markdown_table(result))
    if result.unseen:
        print(f"classes not in the model (scored with the inferred class, flagged): {', '.join(result.unseen)}")
    print(f"tested {len(result.records)} images in {seconds:.1f} s; reports: "
          + ", ".join(str(out / n) for n in names))
    return 0
