"""Dataset readers: every layout, the unified index, preprocessing, image modes and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builders import (
    MASK_BOX,
    make_btad,
    make_folder,
    make_mvtec,
    make_mvtec3d,
    make_visa,
    save_image,
    save_mask,
)
from hgad.data import (
    IMAGENET_MEAN,
    IMAGENET_NORM,
    IMAGENET_STD,
    ImageDataset,
    ImageRecord,
    discover,
    list_image_files,
    load_image,
    load_mask,
    parse_data_arg,
    preprocess,
)
from hgad.errors import ConfigError, InputError

MEAN = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
STD = np.array(IMAGENET_STD, np.float32)[:, None, None]


def unnormalise(t: torch.Tensor) -> np.ndarray:
    """(3, S, S) normalised tensor -> 0..255 float array (hand inverse of the ImageNet step)."""
    return (t.numpy() * STD + MEAN) * 255.0


def expected_box(size: int = 32) -> np.ndarray:
    out = np.zeros((1, size, size), np.float32)
    r0, r1, c0, c1 = MASK_BOX
    out[0, r0:r1, c0:c1] = 1.0
    return out


# ----------------------------------------------------------------------------- layouts

def test_mvtec_layout(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mv")
    cat = discover([f"mvtec:{root}"])
    assert cat.classes == ["alpha", "bottle"]
    assert len(cat.train) == 6 and {r.label for r in cat.train} == {0}
    assert all(r.mask_path is None and r.defect_type == "good" for r in cat.train)
    bottle = [r for r in cat.test if r.class_name == "bottle"]
    assert {r.class_index for r in bottle} == {1}
    assert sorted(r.defect_type for r in bottle) == ["broken", "broken", "crack", "good", "good"]
    for r in bottle:
        assert r.label == (r.defect_type != "good")
        if r.label:
            assert r.mask_path == root / "bottle" / "ground_truth" / r.defect_type / f"{r.path.stem}_mask.png"
        else:
            assert r.mask_path is None
    assert cat.has_masks == {"alpha": True, "bottle": True}
    table = cat.summary()
    assert "bottle" in table and "yes" in table
    assert any(line.split()[:5] == ["bottle", "3", "2", "3", "yes"] for line in table.splitlines())


def test_dataset_items_and_mask_values(tmp_path: Path) -> None:
    cat = discover([f"mvtec:{make_mvtec(tmp_path / 'mv')}"])
    bad = [r for r in cat.test if r.label == 1][0]
    good = [r for r in cat.test if r.label == 0][0]
    ds = ImageDataset([bad, good], img_size=32, mask_size=32, norm=IMAGENET_NORM)
    item = ds[0]
    assert item.image.shape == (3, 32, 32) and item.image.dtype == torch.float32
    np.testing.assert_array_equal(item.mask.numpy(), expected_box())
    assert item.has_mask is True and item.label == 1 and item.index == 0
    assert item.class_index == bad.class_index
    item = ds[1]
    assert item.mask.shape == (1, 32, 32) and item.mask.sum() == 0 and item.label == 0
    # nearest 32 -> 16 keeps source pixels 2i+1: rows 2..5, columns 4..9 of the box
    small = ImageDataset([bad], img_size=16, mask_size=16, norm=IMAGENET_NORM)[0].mask.numpy()
    want = np.zeros((1, 16, 16), np.float32)
    want[0, 2:6, 4:10] = 1
    np.testing.assert_array_equal(small, want)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch.image.shape == (2, 3, 32, 32) and batch.mask.shape == (2, 1, 32, 32)
    assert batch.label.tolist() == [1, 0] and batch.has_mask.tolist() == [True, True]


def test_btad_layout_with_bmp(tmp_path: Path) -> None:
    root = make_btad(tmp_path / "bt")
    cat = discover([("btad", root)])
    assert cat.classes == ["01", "03"]
    assert len(cat.train) == 4
    c3 = [r for r in cat.test if r.class_name == "03"]
    assert [(r.label, r.defect_type) for r in c3] == [(0, "good"), (1, "ko"), (1, "ko")]
    assert c3[1].mask_path == root / "03" / "ground_truth" / "ko" / "0000.bmp"
    np.testing.assert_array_equal(load_mask(c3[1].mask_path, 32).numpy(), expected_box())
    assert all(r.class_index == 1 for r in c3)


def test_mvtec3d_layout_ignores_xyz_and_validation(tmp_path: Path) -> None:
    root = make_mvtec3d(tmp_path / "m3")
    cat = discover([f"mvtec3d:{root}"])
    assert cat.classes == ["cookie"]
    assert [r.path.parent.name for r in cat.train] == ["rgb"] * 3
    assert [(r.defect_type, r.label) for r in cat.test] == [("crack", 1), ("crack", 1), ("good", 0)]
    assert cat.test[0].mask_path == root / "cookie" / "test" / "crack" / "gt" / "000.png"
    assert cat.test[2].mask_path is None


def test_visa_layout_binarises_masks(tmp_path: Path) -> None:
    root = make_visa(tmp_path / "vi")
    cat = discover([f"visa:{root}"])
    assert cat.classes == ["candle", "pcb1"]
    assert len(cat.train) == 6 and len(cat.test) == 6
    bad = [r for r in cat.test if r.label == 1]
    assert {r.defect_type for r in bad} == {"anomaly"}
    assert bad[0].mask_path == root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    np.testing.assert_array_equal(load_mask(bad[0].mask_path, 32).numpy(), expected_box())


def test_folder_layout(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "fo")
    cat = discover([f"folder:{root}"])
    assert cat.classes == ["nuts", "screws"]
    assert cat.has_masks == {"nuts": False, "screws": True}
    screws = [r for r in cat.test if r.class_name == "screws"]
    assert [(r.path.name, r.label, r.mask_path.name if r.mask_path else None) for r in screws] == [
        ("t0.jpg", 0, None), ("a0.png", 1, "a0.png"), ("a1.jpg", 1, "a1_mask.bmp")]
    nut = [r for r in cat.test if r.class_name == "nuts"]
    assert [(r.label, r.mask_path, r.defect_type) for r in nut] == [(1, None, "abnormal")]
    item = ImageDataset(nut, 32, 8, IMAGENET_NORM)[0]
    assert item.has_mask is False and item.mask.sum() == 0 and item.mask.shape == (1, 8, 8)


def test_folder_mask_dir_requires_every_mask(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "fo")
    img = save_image(root / "screws" / "abnormal" / "a2.png")
    with pytest.raises(InputError, match="has no mask") as err:
        discover([f"folder:{root}"])
    assert str(img) in str(err.value)


# ----------------------------------------------------------------------------- unified sets

def test_union_of_two_datasets_has_one_global_index(tmp_path: Path) -> None:
    mv = make_mvtec(tmp_path / "mv")
    bt = make_btad(tmp_path / "bt")
    cat = discover([f"mvtec:{mv}", f"btad:{bt}"])
    assert cat.classes == ["mvtec/alpha", "mvtec/bottle", "btad/01", "btad/03"]
    for r in cat.train + cat.test:
        assert cat.classes[r.class_index] == r.class_name
    assert {r.class_index for r in cat.train} == {0, 1, 2, 3}
    assert [r.class_name for r in cat.train if r.path.is_relative_to(bt)] == ["btad/01"] * 2 + ["btad/03"] * 2
    assert set(cat.has_masks) == set(cat.classes)


def test_same_kind_twice_uses_root_names(tmp_path: Path) -> None:
    a = make_mvtec(tmp_path / "first", {"x": {"bad": 1}})
    b = make_mvtec(tmp_path / "second", {"x": {"bad": 1}})
    cat = discover([f"mvtec:{a}", f"mvtec:{b}"])
    assert cat.classes == ["mvtec-first/x", "mvtec-second/x"]
    with pytest.raises(ConfigError, match="class 'x' is ambiguous; use one of mvtec-first/x, mvtec-second/x"):
        cat.subset(["x"])
    assert cat.subset(["mvtec-second/x"]).classes == ["mvtec-second/x"]
    c = make_mvtec(tmp_path / "other" / "first", {"x": {"bad": 1}})
    with pytest.raises(InputError) as err:
        discover([f"mvtec:{a}", f"mvtec:{c}"])
    assert str(a) in str(err.value) and str(c) in str(err.value)


def test_classes_filter_and_subset(tmp_path: Path) -> None:
    mv = make_mvtec(tmp_path / "mv")
    bt = make_btad(tmp_path / "bt")
    cat = discover([f"mvtec:{mv}", f"btad:{bt}"], classes=["03", "mvtec/bottle"])
    assert cat.classes == ["btad/03", "mvtec/bottle"]
    pairs = {(r.class_name, r.class_index) for r in cat.train + cat.test}
    assert pairs == {("btad/03", 0), ("mvtec/bottle", 1)}
    single = discover([f"mvtec:{mv}"], classes=["mvtec/bottle"])
    assert single.classes == ["bottle"] and {r.class_index for r in single.test} == {0}
    with pytest.raises(ConfigError, match="unknown class 'zebra'; known: mvtec/alpha, mvtec/bottle, btad/01"):
        discover([f"mvtec:{mv}", f"btad:{bt}"], classes=["zebra"])

    full = discover([f"mvtec:{mv}", f"btad:{bt}"])
    sub = full.subset(["btad/01", "mvtec/alpha"])
    assert sub.classes == ["btad/01", "mvtec/alpha"]
    assert sub.has_masks == {"btad/01": True, "mvtec/alpha": True}
    assert len(sub.train) == 2 + 3 and len(sub.test) == 3 + 3
    pairs = {(r.class_name, r.class_index) for r in sub.train + sub.test}
    assert pairs == {("btad/01", 0), ("mvtec/alpha", 1)}
    assert [r.class_index for r in sub.train] == sorted(r.class_index for r in sub.train)
    with pytest.raises(ConfigError, match="--classes: unknown class 'nope'; known: mvtec/alpha"):
        full.subset(["nope"])
    plain = full.subset(["03"])  # a plain name works when it is unambiguous
    assert plain.classes == ["btad/03"] and {r.class_index for r in plain.test} == {0}


def test_parse_data_arg() -> None:
    assert parse_data_arg("mvtec:/data/mvtec ad") == ("mvtec", Path("/data/mvtec ad"))
    assert parse_data_arg("VisA:rel/dir") == ("visa", Path("rel/dir"))
    with pytest.raises(ConfigError, match="--data: .*mvtec, visa, btad, mvtec3d, folder.*'kitti:/x'"):
        parse_data_arg("kitti:/x")
    with pytest.raises(ConfigError, match="--data"):
        parse_data_arg("/just/a/path")
    with pytest.raises(ConfigError, match="--data"):
        discover([("kitti", Path("/x"))])


def test_need_train_and_need_test_flags(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mv")
    only_train = discover([f"mvtec:{root}"], need_test=False)
    assert len(only_train.train) == 6 and only_train.test == []
    only_test = discover([f"mvtec:{root}"], need_train=False)
    assert only_test.train == [] and len(only_test.test) == 8


# ----------------------------------------------------------------------------- preprocessing

def _ramp(width: int, height: int) -> np.ndarray:
    """R = 6 * column, G = 7 * row, B = 100: each pixel's position is readable from its colour."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = (np.arange(width) * 6)[None, :]
    arr[..., 1] = (np.arange(height) * 7)[:, None]
    arr[..., 2] = 100
    return arr


def test_preprocess_centre_crops_the_longer_side() -> None:
    arr = _ramp(40, 30)
    out = preprocess(Image.fromarray(arr), 30, IMAGENET_NORM)
    assert out.shape == (3, 30, 30) and out.dtype == torch.float32
    want = (arr[:, 5:35].transpose(2, 0, 1) / 255.0 - MEAN) / STD
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5)
    tall = _ramp(30, 40)
    out = preprocess(Image.fromarray(tall), 30, IMAGENET_NORM)
    np.testing.assert_allclose(out.numpy(), (tall[5:35].transpose(2, 0, 1) / 255.0 - MEAN) / STD, atol=1e-5)


def test_preprocess_resizes_shorter_side() -> None:
    # 40x30 with red side bands of 5 columns: upscaled to 80x60, the 60-wide centre crop starts
    # exactly where the bands end, so only Lanczos ringing (a few pixels) can bring red in.
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[...] = (0, 200, 0)
    arr[:, :5] = arr[:, 35:] = (250, 0, 0)
    out = unnormalise(preprocess(Image.fromarray(arr), 60, IMAGENET_NORM))
    assert out.shape == (3, 60, 60)
    assert np.abs(out[:, :, 4:56] - np.array([0, 200, 0])[:, None, None]).max() < 3
    assert out[0, :, 0].mean() > 30  # the boundary is still in reach of the first column
    # downscale: 80x60 -> 40x30 -> crop columns 5..34 of the 40-wide image
    big = np.repeat(np.repeat(_ramp(40, 30), 2, axis=0), 2, axis=1)
    out = unnormalise(preprocess(Image.fromarray(big), 30, IMAGENET_NORM))
    np.testing.assert_allclose(out[2], 100, atol=0.01)
    np.testing.assert_allclose(out[0, 15, 3:27], 6 * np.arange(8, 32), atol=4)


def test_normalisation_of_a_constant_image(tmp_path: Path) -> None:
    path = tmp_path / "c.png"
    Image.new("RGB", (50, 70), (255, 0, 128)).save(path)
    out = load_image(path, 20, IMAGENET_NORM)
    want = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    for c in range(3):
        np.testing.assert_allclose(out[c].numpy(), want[c], atol=1e-5)


@pytest.mark.parametrize("case", ["L", "1", "I16", "I", "F", "P", "RGBA", "LA", "CMYK"])
def test_image_modes_load_as_rgb(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"img_{case}.png"
    expect: tuple[float, float, float]
    if case == "L":
        Image.new("L", (20, 12), 77).save(path)
        expect = (77, 77, 77)
    elif case == "1":
        Image.new("1", (20, 12), 1).save(path)
        expect = (255, 255, 255)
    elif case == "I16":
        Image.fromarray(np.full((12, 20), 200 * 257, np.uint16)).save(path)  # 16-bit PNG
        expect = (200, 200, 200)
    elif case == "I":
        path = path.with_suffix(".tif")
        Image.fromarray(np.full((12, 20), 1000 * 257 // 8, np.int32), "I").save(path)
        expect = (125, 125, 125)
    elif case == "F":
        path = path.with_suffix(".tif")
        Image.fromarray(np.full((12, 20), 0.5, np.float32), "F").save(path)
        expect = (128, 128, 128)
    elif case == "P":
        im = Image.new("P", (20, 12), 1)
        im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
        im.save(path)
        expect = (10, 200, 30)
    elif case == "RGBA":
        Image.new("RGBA", (20, 12), (40, 50, 60, 0)).save(path)
        expect = (40, 50, 60)
    elif case == "LA":
        Image.new("LA", (20, 12), (90, 10)).save(path)
        expect = (90, 90, 90)
    else:
        path = path.with_suffix(".jpg")
        Image.new("CMYK", (20, 12), (0, 255, 255, 0)).save(path, quality=95)
        expect = (255, 0, 0)
    out = load_image(path, 8, IMAGENET_NORM)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    np.testing.assert_allclose(unnormalise(out).mean(axis=(1, 2)), expect, atol=1.5)


# ----------------------------------------------------------------------------- bad input

def test_missing_path_and_file_instead_of_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="does not exist") as err:
        discover([f"mvtec:{missing}"])
    assert str(missing) in str(err.value)
    a_file = save_image(tmp_path / "x.png")
    with pytest.raises(InputError, match="is a file") as err:
        discover([f"mvtec:{a_file}"])
    assert str(a_file) in str(err.value)


@pytest.mark.parametrize("kind, text", [
    ("mvtec", "no class folders with train/good/ found (expected MVTec AD layout <cls>/train/good/*.png)"),
    ("btad", "expected BTAD layout"),
    ("mvtec3d", "expected MVTec 3D-AD layout"),
    ("visa", "no split_csv/1cls.csv found"),
    ("folder", "expected folder layout"),
])
def test_folder_matching_no_layout(tmp_path: Path, kind: str, text: str) -> None:
    (tmp_path / "empty" / "junk").mkdir(parents=True)
    with pytest.raises(InputError) as err:
        discover([f"{kind}:{tmp_path / 'empty'}"])
    assert str(err.value).startswith(f"{tmp_path / 'empty'}: ") and text in str(err.value)


def test_layout_hints(tmp_path: Path) -> None:
    bt = make_btad(tmp_path / "bt")
    with pytest.raises(InputError, match="class '01'|no training images") as err:
        discover([f"mvtec:{bt}"])
    assert str(bt / "01" / "train" / "good") in str(err.value)
    mv = make_mvtec(tmp_path / "mv")
    with pytest.raises(InputError, match="single class folder"):
        discover([f"btad:{mv / 'bottle'}"])
    with pytest.raises(InputError, match="looks like the mvtec layout"):
        discover([f"visa:{mv}"])


def test_class_without_training_images(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mv")
    for p in (root / "alpha" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(InputError, match="no training images") as err:
        discover([f"mvtec:{root}"])
    assert str(root / "alpha" / "train" / "good") in str(err.value)
    assert discover([f"mvtec:{root}"], classes=["bottle"]).classes == ["bottle"]
    assert len(discover([f"mvtec:{root}"], need_train=False).test) == 8


@pytest.mark.parametrize("kind", ["mvtec", "btad", "mvtec3d", "visa"])
def test_anomalous_image_without_mask(tmp_path: Path, kind: str) -> None:
    if kind == "mvtec":
        root = make_mvtec(tmp_path / "d")
        mask = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
        image = root / "bottle" / "test" / "crack" / "000.png"
    elif kind == "btad":
        root = make_btad(tmp_path / "d")
        mask = root / "03" / "ground_truth" / "ko" / "0001.bmp"
        image = root / "03" / "test" / "ko" / "0001.bmp"
    elif kind == "mvtec3d":
        root = make_mvtec3d(tmp_path / "d")
        mask = root / "cookie" / "test" / "crack" / "gt" / "001.png"
        image = root / "cookie" / "test" / "crack" / "rgb" / "001.png"
    else:
        root = make_visa(tmp_path / "d")
        mask = root / "pcb1" / "Data" / "Masks" / "Anomaly" / "001.png"
        image = root / "pcb1" / "Data" / "Images" / "Anomaly" / "001.JPG"
    mask.unlink()
    with pytest.raises(InputError, match="anomalous image has no mask") as err:
        discover([f"{kind}:{root}"])
    msg = str(err.value)
    assert msg.startswith(f"{image}: ")
    assert str(mask.with_suffix(".png")) in msg


def test_visa_empty_mask_column_and_csv_errors(tmp_path: Path) -> None:
    root = make_visa(tmp_path / "v1", rows=["candle,test,anomaly,candle/Data/Images/Normal/000.JPG,"])
    with pytest.raises(InputError, match="empty mask column"):
        discover([f"visa:{root}"])
    root = make_visa(tmp_path / "v2", rows=["candle,test,broken,candle/x.JPG,"])
    with pytest.raises(InputError, match="unknown label 'broken'") as err:
        discover([f"visa:{root}"])
    assert str(root / "split_csv" / "1cls.csv") in str(err.value)
    root = make_visa(tmp_path / "v3", rows=["candle,train,normal,candle/missing.JPG,"])
    with pytest.raises(InputError, match="but missing") as err:
        discover([f"visa:{root}"])
    assert str(root / "candle" / "missing.JPG") in str(err.value)
    (root / "split_csv" / "1cls.csv").write_text("object,split,image\npcb1,train,a.png\n")
    with pytest.raises(InputError, match="missing column"):
        discover([f"visa:{root}"])


def test_mask_without_image(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mv")
    orphan = save_mask(root / "bottle" / "ground_truth" / "crack" / "007_mask.png")
    with pytest.raises(InputError, match="mask has no matching image") as err:
        discover([f"mvtec:{root}"])
    assert str(err.value).startswith(f"{orphan}: ")


def test_mask_of_wrong_size(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mv")
    mask = save_mask(root / "bottle" / "ground_truth" / "crack" / "000_mask.png", size=(20, 24))
    image = root / "bottle" / "test" / "crack" / "000.png"
    want = f"{mask}: mask size 20x24 differs from image size 32x32 of {image}"
    with pytest.raises(InputError) as err:
        discover([f"mvtec:{root}"])
    assert str(err.value) == want
    record = ImageRecord(image, "bottle", 0, 1, mask, "crack")
    with pytest.raises(InputError) as err:
        ImageDataset([record], 16, 256, IMAGENET_NORM)[0]
    assert str(err.value) == want


def test_non_binary_mask_is_binarised(tmp_path: Path) -> None:
    arr = np.zeros((10, 10), np.uint8)
    arr[1, 2], arr[3, 4], arr[5, 6] = 1, 7, 128
    Image.fromarray(arr).save(tmp_path / "m.png")
    out = load_mask(tmp_path / "m.png", 10)
    assert out.shape == (1, 10, 10) and out.dtype == torch.float32
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert sorted(map(tuple, torch.nonzero(out[0]).tolist())) == [(1, 2), (3, 4), (5, 6)]
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[2, 2, 1] = 9
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert load_mask(tmp_path / "rgb.png", 10).sum() == 1


def _truncated_png(path: Path) -> Path:
    save_image(path, (64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "missing"])
def test_unreadable_images_raise_input_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image at all\n")
    elif kind == "truncated":
        _truncated_png(path)
    for load in (lambda: load_image(path, 8, IMAGENET_NORM), lambda: load_mask(path, 8)):
        with pytest.raises(InputError) as err:
            load()
        assert str(err.value).startswith(f"{path}: ")
        assert ("does not exist" if kind == "missing" else "cannot read image: ") in str(err.value)
        assert err.value.__cause__ is None  # no PIL traceback chained to the message
        assert err.value.__context__ is None or err.value.__suppress_context__


def test_corrupt_files_in_datasets(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mv")
    mask = root / "bottle" / "ground_truth" / "broken" / "001_mask.png"
    mask.write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot read image") as err:
        discover([f"mvtec:{root}"])
    assert str(err.value).startswith(f"{mask}: ")
    save_mask(mask)
    train_img = _truncated_png(root / "alpha" / "train" / "good" / "001.png")
    cat = discover([f"mvtec:{root}"])  # discover does not decode training images
    ds = ImageDataset(cat.train, 16, 256, IMAGENET_NORM)
    bad = [i for i, r in enumerate(cat.train) if r.path == train_img][0]
    with pytest.raises(InputError, match="cannot read image: .*truncated") as err:
        ds[bad]
    assert str(train_img) in str(err.value)


def test_list_image_files(tmp_path: Path) -> None:
    a = save_image(tmp_path / "imgs" / "b.png")
    b = save_image(tmp_path / "imgs" / "sub" / "a.JPG")
    save_image(tmp_path / "imgs" / ".hidden" / "c.png")
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    c = save_image(tmp_path / "single.bmp")
    assert list_image_files([tmp_path / "imgs", c, a]) == [a, b, c]
    with pytest.raises(InputError, match="does not exist") as err:
        list_image_files([tmp_path / "missing"])
    assert str(tmp_path / "missing") in str(err.value)
    with pytest.raises(InputError, match="not an image file"):
        list_image_files([tmp_path / "imgs" / "notes.txt"])
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match="no image files found") as err:
        list_image_files([tmp_path / "none"])
    assert str(tmp_path / "none") in str(err.value)
