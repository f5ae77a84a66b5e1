"""``hgad demo-data``: write the built-in demo dataset."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["NAME", "add_parser", "run"]

NAME = "demo-data"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``demo-data`` sub-parser."""
    d = sub.add_parser(NAME, help="write the built-in demo dataset (MVTec AD layout)",
                       description="Write a small MVTec-AD-layout dataset made from real photographs bundled "
                       "with scikit-image (CC0), with synthetic defects and exact masks.")
    d.add_argument("out_dir", type=Path, help="folder to create")
    d.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    d.add_argument("--n-train", type=int, default=40, help="normal training images per class")
    d.add_argument("--n-test-good", type=int, default=10, help="normal test images per class")
    d.add_argument("--n-test-defect", type=int, default=18, help="defective test images per class")
    d.add_argument("--size", type=int, default=256, help="image size in pixels")


def run(args: argparse.Namespace) -> int:
    """Write the dataset and print its summary."""
    from hgad.data import discover
    from hgad.demo import make_demo_dataset
    from hgad.io import check_writable

    check_writable(args.out_dir)
    t0 = time.perf_counter()
    make_demo_dataset(args.out_dir, seed=args.seed, n_train=args.n_train, n_test_good=args.n_test_good,
                      n_test_defect=args.n_test_defect, size=args.size, progress=True)
    print(discover([("mvtec", args.out_dir)]).summary())
    print(f"demo dataset written to {args.out_dir} in {time.perf_counter() - t0:.1f} s "
          f"(use --data mvtec:{args.out_dir})")
    return 0
