"""What a graph written by ``hgad export`` looks like from outside: tensor names and the opset range.

Kept free of torch and onnx so that the command line can describe ``--opset`` without loading either.
"""

from __future__ import annotations

__all__ = ["INPUT_NAME", "OUTPUT_NAMES", "DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET", "META_KEY"]

INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score", "class_index", "class_confidence")
DEFAULT_OPSET = 17
MIN_OPSET = 13  # per-image reductions and gathers as used here need opset 13 operator forms
MAX_OPSET = 20  # the last opset of torch's TorchScript-based exporter
META_KEY = "hgad_version"  # present in every graph hgad writes
