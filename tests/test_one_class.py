"""Issue 12: a model of ONE class (the most common user case) must detect defects with the default
preset and score. With one class the class posterior is certain, its entropy map is identically 0
and the paper's product score would be constant (it falls back to the log-likelihood map); the default
score, the distance to the class's memory bank, needs no posterior."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hgad.cli import main
from hgad.demo import make_demo_dataset


@pytest.mark.slow
def test_one_class_default_model_finds_brick_defects(tmp_path: Path, capsys) -> None:
    data = make_demo_dataset(tmp_path / "demo", seed=0) and tmp_path / "demo"
    run = tmp_path / "brick"
    assert main(["train", "--data", f"mvtec:{data}", "--classes", "brick", "--out", str(run),
                 "--no-progress"]) == 0
    assert main(["test", str(run), "--no-progress", "--no-report"]) == 0
    metrics = json.loads((run / "test-deploy-inferred" / "metrics.json").read_text())
    assert metrics["score"] == "knn"
    assert list(metrics["per_class"]) == ["brick"]
    assert metrics["mean"]["pixel_auroc"] >= 0.80, metrics["mean"]
