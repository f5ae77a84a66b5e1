"""Built-in demo dataset: determinism, masks, MVTec layout and refusal to overwrite user data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hgad import demo
from hgad.data import discover
from hgad.demo import DEFECT_KINDS, DEMO_CLASSES, make_demo_dataset
from hgad.errors import ConfigError, InputError

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect": 4, "size": 64}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    counts = make_demo_dataset(root, seed=3, **SMALL)
    assert counts == {c: {"train": 3, "test_good": 2, "test_defect": 4} for c in DEMO_CLASSES}
    return root


def test_same_seed_is_byte_identical_other_seed_differs(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    make_demo_dataset(again, seed=3, **SMALL)
    assert _files(again) == _files(small)
    other = tmp_path / "other"
    make_demo_dataset(other, seed=4, **SMALL)
    a, b = _files(small), _files(other)
    assert a.keys() == b.keys()
    images = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != b[k] for k in images) == len(images)


def test_layout_counts_and_discover(small: Path) -> None:
    assert len(DEMO_CLASSES) >= 4
    cat = discover([f"mvtec:{small}"])
    assert cat.classes == sorted(DEMO_CLASSES)
    for i, cls in enumerate(cat.classes):
        train = [r for r in cat.train if r.class_name == cls]
        test = [r for r in cat.test if r.class_name == cls]
        assert len(train) == 3 and {r.class_index for r in train + test} == {i}
        assert sum(r.label == 0 for r in test) == 2
        assert sorted(r.defect_type for r in test if r.label == 1) == sorted(DEFECT_KINDS)
        assert all(r.mask_path is not None and r.mask_path.is_file() for r in test if r.label == 1)
    assert set(cat.has_masks.values()) == {True}
    assert len(set(DEFECT_KINDS)) >= 4
    readme = (small / "README.txt").read_text()
    assert "CC0" in readme and "scikit-image" in readme


def test_images_and_masks(small: Path) -> None:
    digests = set()
    for cls in DEMO_CLASSES:
        for p in sorted((small / cls / "train" / "good").glob("*.png")):
            with Image.open(p) as im:
                assert im.size == (64, 64) and im.mode in ("L", "RGB")
            digests.add(hashlib.sha256(p.read_bytes()).hexdigest())
        for kind in DEFECT_KINDS:
            (img,) = sorted((small / cls / "test" / kind).glob("*.png"))
            mask_path = small / cls / "ground_truth" / kind / f"{img.stem}_mask.png"
            with Image.open(mask_path) as m:
                assert m.mode == "L" and m.size == (64, 64)
                arr = np.asarray(m)
            assert set(np.unique(arr).tolist()) <= {0, 255}
            assert 4 <= (arr > 0).sum() < 0.5 * arr.size
    assert len(digests) == 3 * len(DEMO_CLASSES)  # every training image is distinct


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_mask_covers_exactly_the_meaningful_changes(kind: str) -> None:
    sources = demo._load_sources()
    for cls in ("gravel", "coffee"):
        rng = np.random.default_rng(11)
        before = demo._normal_image(rng, cls, sources[cls], 96, held_out=True)
        after, mask = demo.plant_defect(rng, before, kind, cls, sources)
        lum = before.mean(axis=2)
        threshold = max(0.05 * max(np.percentile(lum, 95) - np.percentile(lum, 5), 30.0), 4.0)
        changed = np.abs(after - before).max(axis=2) > threshold
        assert mask.any() and changed.any()
        assert not (changed & ~mask).any()  # every meaningful change is marked
        assert changed[mask].mean() > 0.2  # and the mask is not much larger than the change
        assert np.abs(after - before)[~mask].max(initial=0) <= threshold


def test_rerun_replaces_an_earlier_demo(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_demo_dataset(root, seed=0, **SMALL)
    make_demo_dataset(root, seed=0, **{**SMALL, "n_train": 2, "n_test_defect": 1})
    assert len(list((root / "brick" / "train" / "good").iterdir())) == 2
    assert not (root / "brick" / "test" / "stain").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folders left


def test_refuses_foreign_folders(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="not empty") as err:
        make_demo_dataset(busy, **SMALL)
    assert str(busy) in str(err.value)
    assert sorted(p.name for p in busy.iterdir()) == ["thesis.tex"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        make_demo_dataset(a_file, **SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    make_demo_dataset(empty, seed=1, n_train=1, n_test_good=0, n_test_defect=1, size=32)
    assert (empty / "README.txt").is_file()
    with pytest.raises(ConfigError, match="--seed"):
        make_demo_dataset(tmp_path / "neg", seed=-1)
