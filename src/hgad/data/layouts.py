"""Layout scanners: where each public anomaly-detection dataset keeps its images and masks.

Each scanner lists one class's training images and its test images with label, mask and defect
type, and checks the image/mask pairing and the mask sizes from the file headers (no decoding), so
that these errors surface before training. Layouts (``KIND:PATH`` on the command line):

* ``mvtec``   ``<cls>/train/good/*``, ``<cls>/test/<type>/*``,
  ``<cls>/ground_truth/<type>/<stem>_mask.png``.
* ``btad``    ``<cls>/train/ok``, ``<cls>/test/{ok,ko}``, ``<cls>/ground_truth/ko/<stem>.<ext>``.
* ``mvtec3d`` RGB only: ``<cls>/{train,test}/<type>/rgb/*``, masks ``<cls>/test/<type>/gt/<stem>.<ext>``.
* ``visa``    ``split_csv/1cls.csv`` with columns ``object,split,label,image,mask``.
* ``folder``  ``<cls>/normal/`` (training), optional ``<cls>/normal_test/``, ``<cls>/abnormal/`` and
  ``<cls>/mask/`` (``<stem>.<ext>`` or ``<stem>_mask.<ext>``).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hgad.data.images import IMAGE_EXTS, check_pair_sizes, check_regular, is_image_file
from hgad.errors import InputError, brief

__all__ = ["KINDS", "LAYOUT_HINTS", "LAYOUTS", "ClassScan"]

KINDS = ("mvtec", "visa", "btad", "mvtec3d", "folder")

LAYOUT_HINTS = {
    "mvtec": "MVTec AD layout <cls>/train/good/*.png",
    "btad": "BTAD layout <cls>/train/ok/*",
    "mvtec3d": "MVTec 3D-AD layout <cls>/train/good/rgb/*.png",
    "visa": "VisA layout with split_csv/1cls.csv",
    "folder": "folder layout <cls>/normal/*",
}


@dataclass
class ClassScan:
    """The images of one class as a layout lists them (before they become catalog records)."""

    train: list[Path]
    test: list[tuple[Path, int, Path | None, str]]  # (image, label, mask, defect type)
    masks_expected: bool


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted by name); empty when it does not exist."""
    if not folder.is_dir():
        return []
    entries = list(folder.iterdir())
    for p in entries:  # a FIFO or device named like an image would hang or never end: refuse, do not skip
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.exists() and not p.is_file() \
                and not p.is_dir():
            check_regular(p)
    return sorted((p for p in entries if is_image_file(p)), key=lambda p: p.name)


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _stem_index(folder: Path) -> dict[str, Path]:
    """Stem -> image file in ``folder`` (the first by name when a stem has several extensions)."""
    index: dict[str, Path] = {}
    for p in _images_in(folder):
        index.setdefault(p.stem, p)
    return index


def _guess_kind(root: Path) -> str | None:
    """A cheap guess of which layout ``root`` follows, for hints in error messages."""
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    for cls in _subdirs(root):
        if (cls / "train" / "good" / "rgb").is_dir():
            return "mvtec3d"
        if (cls / "train" / "good").is_dir():
            return "mvtec"
        if (cls / "train" / "ok").is_dir():
            return "btad"
        if (cls / "normal").is_dir():
            return "folder"
    return None


def _no_layout(kind: str, root: Path, what: str) -> InputError:
    problem = f"no class folders with {what} found (expected {LAYOUT_HINTS[kind]})"
    guess = _guess_kind(root)
    if guess is None and any((root / d).is_dir() for d in ("train", "test", "normal")):
        problem += "; this looks like a single class folder: give its parent folder"
    elif guess is not None and guess != kind:
        problem += f"; it looks like the {guess} layout: use {guess}:{root}"
    return InputError(root, problem)


class _DirLayout:
    """Shared logic of the folder-per-class layouts (MVTec AD, BTAD, MVTec 3D-AD, folder)."""

    kind = ""
    class_marker: tuple[str, ...] = ("train", "test")
    marker_text = ""

    def __init__(self, root: Path) -> None:
        self.root = root

    def classes(self) -> list[str]:
        names = [d.name for d in _subdirs(self.root) if any((d / m).is_dir() for m in self.class_marker)]
        if not names:
            raise _no_layout(self.kind, self.root, self.marker_text)
        return names

    def train_dir(self, cls: Path) -> Path:
        raise NotImplementedError

    def test_groups(self, cls: Path) -> list[tuple[Path, str, int]]:
        """(image folder, defect type, label) of each test group of a class."""
        raise NotImplementedError

    def mask_dir(self, cls: Path, defect: str) -> Path | None:
        raise NotImplementedError

    def mask_stems(self, stem: str) -> tuple[str, ...]:
        return (stem,)

    def has_mask_folders(self, cls: Path) -> bool:
        """Whether the class has ground-truth masks at all; a class without them has image labels only."""
        return (cls / "ground_truth").is_dir()

    def scan(self, name: str, need_train: bool, need_test: bool) -> ClassScan:
        cls = self.root / name
        train: list[Path] = []
        test: list[tuple[Path, int, Path | None, str]] = []
        if need_train:
            train = _images_in(self.train_dir(cls))
            if not train:
                problem = f"no training images (expected {LAYOUT_HINTS[self.kind]})"
                guess = _guess_kind(self.root)
                if guess is not None and guess != self.kind:
                    problem += f"; it looks like the {guess} layout: use {guess}:{self.root}"
                raise InputError(self.train_dir(cls), problem)
        masks_expected = self.has_mask_folders(cls)
        if need_test:
            for folder, defect, label in self.test_groups(cls):
                images = _images_in(folder)
                mdir = self.mask_dir(cls, defect) if label == 1 and masks_expected else None
                if label == 1 and mdir is None:
                    masks_expected = False
                masks = _stem_index(mdir) if mdir is not None else {}
                used: set[Path] = set()
                for img in images:
                    mask = None
                    if mdir is not None:
                        mask = next((masks[s] for s in self.mask_stems(img.stem) if s in masks), None)
                        if mask is None:
                            expected = mdir / f"{self.mask_stems(img.stem)[0]}.png"
                            raise InputError(img, f"anomalous image has no mask; expected {expected}")
                        check_pair_sizes(img, mask)
                        used.add(mask)
                    test.append((img, label, mask, defect))
                for m in masks.values():
                    if m not in used:
                        raise InputError(m, f"mask has no matching image in {folder}")
        return ClassScan(train, test, masks_expected)


class _MVTec(_DirLayout):
    kind = "mvtec"
    marker_text = "train/good/"

    def train_dir(self, cls: Path) -> Path:
        return cls / "train" / "good"

    def test_groups(self, cls: Path) -> list[tuple[Path, str, int]]:
        groups = [(d, d.name, 0 if d.name == "good" else 1) for d in _subdirs(cls / "test")]
        known = {d.name for d in _subdirs(cls / "test")}
        for gt in _subdirs(cls / "ground_truth"):
            if gt.name not in known and _images_in(gt):
                raise InputError(_images_in(gt)[0],
                                 f"mask has no matching image folder {cls / 'test' / gt.name}")
        return groups

    def mask_dir(self, cls: Path, defect: str) -> Path:
        return cls / "ground_truth" / defect

    def mask_stems(self, stem: str) -> tuple[str, ...]:
        return (f"{stem}_mask",)


class _BTAD(_DirLayout):
    kind = "btad"
    marker_text = "train/ok/"

    def train_dir(self, cls: Path) -> Path:
        return cls / "train" / "ok"

    def test_groups(self, cls: Path) -> list[tuple[Path, str, int]]:
        return [(cls / "test" / "ok", "good", 0), (cls / "test" / "ko", "ko", 1)]

    def mask_dir(self, cls: Path, defect: str) -> Path:
        return cls / "ground_truth" / "ko"


class _MVTec3D(_DirLayout):
    kind = "mvtec3d"
    marker_text = "train/good/rgb/"

    def train_dir(self, cls: Path) -> Path:
        return cls / "train" / "good" / "rgb"

    def test_groups(self, cls: Path) -> list[tuple[Path, str, int]]:
        return [(d / "rgb", d.name, 0 if d.name == "good" else 1) for d in _subdirs(cls / "test")]

    def mask_dir(self, cls: Path, defect: str) -> Path:
        return cls / "test" / defect / "gt"

    def has_mask_folders(self, cls: Path) -> bool:
        return any((d / "gt").is_dir() for d in _subdirs(cls / "test"))


class _Folder(_DirLayout):
    kind = "folder"
    class_marker = ("normal", "normal_test", "abnormal")
    marker_text = "normal/"

    def train_dir(self, cls: Path) -> Path:
        return cls / "normal"

    def test_groups(self, cls: Path) -> list[tuple[Path, str, int]]:
        return [(cls / "normal_test", "good", 0), (cls / "abnormal", "abnormal", 1)]

    def mask_dir(self, cls: Path, defect: str) -> Path | None:
        return cls / "mask" if (cls / "mask").is_dir() else None

    def has_mask_folders(self, cls: Path) -> bool:
        return (cls / "mask").is_dir()

    def mask_stems(self, stem: str) -> tuple[str, ...]:
        return (stem, f"{stem}_mask")


class _VisA:
    """VisA: every image is listed in ``split_csv/1cls.csv`` with paths relative to the root."""

    kind = "visa"
    columns = ("object", "split", "label", "image", "mask")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.csv_path = root / "split_csv" / "1cls.csv"
        if not self.csv_path.is_file():
            raise _no_layout_visa(root)
        self.rows = self._read()

    def _read(self) -> list[tuple[int, str, str, str, str, str]]:
        try:
            with open(self.csv_path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                header = [h.strip().lower() for h in (reader.fieldnames or [])]
                missing = [c for c in self.columns if c not in header]
                if missing:
                    raise InputError(self.csv_path, f"missing column(s) {', '.join(missing)}; "
                                     f"expected header {','.join(self.columns)}")
                reader.fieldnames = header
                rows = []
                for row in reader:
                    vals = [(row.get(c) or "").strip() for c in self.columns]
                    rows.append((reader.line_num, *vals))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise InputError(self.csv_path, f"cannot read csv: {brief(err)}") from None
        for line, obj, split, label, image, _mask in rows:
            if not obj or not image:
                raise InputError(self.csv_path, f"line {line}: empty object or image column")
            if split not in ("train", "test"):
                raise InputError(self.csv_path,
                                 f"line {line}: unknown split '{split}' (expected train or test)")
            if label not in ("normal", "anomaly"):
                raise InputError(self.csv_path,
                                 f"line {line}: unknown label '{label}' (expected normal or anomaly)")
            if split == "train" and label == "anomaly":
                raise InputError(self.csv_path, f"line {line}: training image labelled anomaly")
        if not rows:
            raise InputError(self.csv_path, "no rows (expected VisA split csv object,split,label,image,mask)")
        return rows

    def classes(self) -> list[str]:
        return sorted({r[1] for r in self.rows})

    def scan(self, name: str, need_train: bool, need_test: bool) -> ClassScan:
        train: list[Path] = []
        test: list[tuple[Path, int, Path | None, str]] = []
        for line, obj, split, label, image, mask in self.rows:
            if obj != name or (split == "train" and not need_train) or (split == "test" and not need_test):
                continue
            img = self.root / image
            if not img.is_file():
                raise InputError(img, f"listed in {self.csv_path} line {line} but missing")
            if split == "train":
                train.append(img)
            elif label == "normal":
                test.append((img, 0, None, "good"))
            else:
                if not mask:
                    raise InputError(img, "anomalous image has no mask "
                                          f"(empty mask column in {self.csv_path} line {line})")
                mpath = self.root / mask
                if not mpath.is_file():
                    raise InputError(img, f"anomalous image has no mask; expected {mpath}")
                check_pair_sizes(img, mpath)
                test.append((img, 1, mpath, "anomaly"))
        if need_train and not train:
            raise InputError(self.csv_path, f"class '{name}' has no training images")
        return ClassScan(train, test, True)


def _no_layout_visa(root: Path) -> InputError:
    problem = f"no split_csv/1cls.csv found (expected {LAYOUT_HINTS['visa']})"
    guess = _guess_kind(root)
    if guess is not None:
        problem += f"; it looks like the {guess} layout: use {guess}:{root}"
    return InputError(root, problem)


LAYOUTS: dict[str, Callable[[Path], _DirLayout | _VisA]] = {
    "mvtec": _MVTec, "btad": _BTAD, "mvtec3d": _MVTec3D, "folder": _Folder, "visa": _VisA,
}
