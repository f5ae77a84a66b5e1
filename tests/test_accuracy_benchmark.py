"""The accuracy benchmark runs end to end (``--smoke``) and its development dataset is what it claims."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from hgad.data import discover

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from devdata import DEV_CLASSES, DEV_KINDS, IMAGE_LABEL_ONLY, make_dev_dataset  # noqa: E402

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect": 5, "size": 64}


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_dev6_layout_kinds_masks_and_determinism(tmp_path: Path) -> None:
    a = make_dev_dataset(tmp_path / "a", seed=0, **SMALL)
    b = make_dev_dataset(tmp_path / "b", seed=0, **SMALL)
    assert _digest(a) == _digest(b)
    assert _digest(make_dev_dataset(tmp_path / "c", seed=1, **SMALL)) != _digest(a)
    cat = discover([f"mvtec:{a}"])
    assert cat.classes == sorted(DEV_CLASSES) and len(cat.classes) >= 6
    for name in DEV_CLASSES:
        assert cat.has_masks[name] is (name not in IMAGE_LABEL_ONLY)
        kinds = {r.defect_type for r in cat.test if r.class_name == name and r.label == 1}
        assert kinds == set(DEV_KINDS) and len(kinds) >= 4
    for rec in cat.test:  # every mask marks pixels that really changed... and only defective images have one
        if rec.mask_path is not None:
            mask = np.asarray(Image.open(rec.mask_path)) > 0
            assert mask.any()


def test_dev6_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    import pytest

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit, match="not written by devdata.py"):
        make_dev_dataset(mine, seed=0, **SMALL)
    assert (mine / "keep.txt").read_text() == "user data"


def test_accuracy_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    proc = subprocess.run([sys.executable, str(BENCH / "accuracy.py"), "--smoke", "--datasets", "demo",
                           "--threads", "1", "--work", str(tmp_path / "w"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.read_text())
    demo = payload["datasets"]["demo"]
    assert set(demo) == {"hgad", "gaussian_per_class", "gaussian_unified"}
    for result in demo.values():
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert 0.0 <= result[key] <= 1.0
        assert result["train_s"] >= 0 and result["peak_rss_mib"] > 0
        assert set(result["per_class"]) == {"brick", "coffee", "grass", "gravel"}
    assert "| demo | hgad |" in proc.stdout and "per-class Gaussian" in proc.stdout
    # the same run re-scored in the exploration's other ways, and their table
    scores = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, str(BENCH / "explore_scores.py"), "--run",
                           str(tmp_path / "w" / "runs" / "default" / "demo" / "hgad" / "run"), "--data",
                           str(tmp_path / "w" / "data" / "demo-smoke"), "--out", str(scores)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    variants = json.loads(scores.read_text())["variants"]
    assert {"logp", "latent gauss", "input gauss", "latent gauss / top1%"} <= set(variants)
    assert all(0.0 <= v["image_auroc"] <= 1.0 for v in variants.values())
    proc = subprocess.run([sys.executable, str(BENCH / "explore_scores.py"), "--table", str(scores)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "| latent gauss |" in proc.stdout
