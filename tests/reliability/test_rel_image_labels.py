"""Issue 14, item 9: classes with image-level labels only (no ground-truth masks) load and are tested.

Such a class gets image metrics; its pixel metrics are absent ("–") and the table says why. A class
with some masks but not all stays an error (``tests/test_data.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from relhelp import run_cli

from builders import make_btad, make_mvtec, make_mvtec3d
from conftest import tiny_flags
from hgad.data import discover


@pytest.mark.parametrize("kind", ["mvtec", "btad", "mvtec3d"])
def test_class_without_masks_loads_with_image_labels(tmp_path: Path, kind: str) -> None:
    if kind == "mvtec":
        root = make_mvtec(tmp_path / "d", {"bottle": {"broken": 2}, "cap": {"dent": 2}})
        shutil.rmtree(root / "cap" / "ground_truth")
        plain, masked = "cap", "bottle"
    elif kind == "btad":
        root = make_btad(tmp_path / "d")
        classes = sorted(p.name for p in root.iterdir())
        plain, masked = classes[0], classes[1]
        shutil.rmtree(root / plain / "ground_truth")
    else:
        root = make_mvtec3d(tmp_path / "d")
        plain = "cookie"
        for gt in (root / plain / "test").glob("*/gt"):
            shutil.rmtree(gt)
        masked = None
    cat = discover([f"{kind}:{root}"])
    assert cat.has_masks[plain] is False
    bad = [r for r in cat.test if r.class_name == plain and r.label == 1]
    assert bad and all(r.mask_path is None for r in bad)
    if masked is not None:
        assert cat.has_masks[masked] is True


def test_test_reports_image_metrics_only_for_unmasked_class(tmp_path: Path, capsys) -> None:
    root = make_mvtec(tmp_path / "d", {"bottle": {"broken": 2}, "cap": {"dent": 2}}, n_train=4, n_good=2)
    shutil.rmtree(root / "cap" / "ground_truth")
    run = tmp_path / "run"
    rc, err, _ = run_cli(["train", "--data", f"mvtec:{root}", "--out", run, "--no-progress",
                          *tiny_flags(meta_epochs=1, stage1_epochs=1, warmup_epochs=0)], capsys)
    assert rc == 0, err
    rc, err, out = run_cli(["test", run, "--no-progress", "--no-report"], capsys)
    assert rc == 0, err
    cap_row = next(line for line in out.splitlines() if line.startswith("| cap |"))
    cells = [c.strip() for c in cap_row.strip("|").split("|")]
    assert cells[1] != "–" and cells[2] == "–" and cells[3] == "–"  # I-AUROC yes; P-AUROC, AUPRO no
    assert "image labels only (no ground-truth masks" in out.lower()
