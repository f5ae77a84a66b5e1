"""``hgad export``: write a run's deploy-protocol inference path as one ONNX graph."""

from __future__ import annotations

import argparse
from pathlib import Path

from hgad.cli.common import add_weights_arg, load_run_model
from hgad.errors import InputError
from hgad.onnx_spec import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

__all__ = ["NAME", "add_parser", "run"]

NAME = "export"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``export`` sub-parser."""
    p = sub.add_parser(
        NAME, help="export a run's inference path (ONNX) for onnxruntime",
        description="Export the whole deploy-protocol inference path of a run (preprocessed image batch -> "
        "anomaly map, image score, inferred class, class confidence) as one ONNX graph with a dynamic batch "
        "and the training statistics built in. Class names, thresholds, img_size and map_size are stored in "
        "the model's metadata. The export is checked with onnxruntime on a random batch before it is "
        "written. "
        "Needs: pip install 'hgad[onnx]'. Run it with: hgad predict RUN_DIR PATH --onnx FILE.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="trained run folder")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format (only onnx)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="file to write (atomically)")
    add_weights_arg(p)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset version, {MIN_OPSET} to {MAX_OPSET} (default: {DEFAULT_OPSET})")


def run(args: argparse.Namespace) -> int:
    """Export, check with onnxruntime, and say how well the two agree."""
    from hgad.checkpoint import MODEL_FILE
    from hgad.export import export_onnx
    from hgad.io import check_writable

    if args.out.is_dir():
        raise InputError(args.out, "is a folder; --out names the file to write")
    check_writable(args.out.parent)
    model = load_run_model(args.run_dir, "cpu", args.backbone_weights)
    try:
        check = export_onnx(model, args.out, opset=args.opset)
    except InputError as err:
        if err.path != "model":
            raise
        raise InputError(Path(args.run_dir) / MODEL_FILE, err.problem) from None
    print(f"onnxruntime check on a random batch of {check.n_images}: classes agree {check.classes_agree}/"
          f"{check.n_images}, max relative diff {check.max_diff:.3g} (maps, scores, confidences)")
    print(f"exported {args.run_dir} ({len(model.class_names)} classes, img_size {model.cfg.img_size}, "
          f"{check.n_nodes} nodes, opset {args.opset}) to {args.out}")
    return 0
