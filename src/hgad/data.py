"""Dataset readers: find the images of the public anomaly-detection layouts and load them.

A unified (multi-class) model is trained on the normal images of every class at once, so all
readers produce one :class:`Catalog` with a single global class index, whatever mix of datasets
was given.  Bad input (missing folders, images without masks, masks of the wrong size, corrupt
files) is reported as :class:`~hgad.errors.InputError` naming the offending path, as early as
possible: :func:`discover` checks the layout, the image/mask pairing and the mask sizes (PIL header
reads, no decoding), and the loaders turn any decoding failure into an ``InputError`` too.

Supported layouts (``KIND:PATH`` on the command line):

* ``mvtec``   ``<cls>/train/good/*``, ``<cls>/test/<type>/*``,
  ``<cls>/ground_truth/<type>/<stem>_mask.png``.
* ``btad``    ``<cls>/train/ok``, ``<cls>/test/{ok,ko}``, ``<cls>/ground_truth/ko/<stem>.<ext>``.
* ``mvtec3d`` RGB only: ``<cls>/{train,test}/<type>/rgb/*``, masks ``<cls>/test/<type>/gt/<stem>.<ext>``.
* ``visa``    ``split_csv/1cls.csv`` with columns ``object,split,label,image,mask``.
* ``folder``  ``<cls>/normal/`` (training), optional ``<cls>/normal_test/``, ``<cls>/abnormal/`` and
  ``<cls>/mask/`` (``<stem>.<ext>`` or ``<stem>_mask.<ext>``).

Masks are binarised with ``> 0`` (any non-zero value, in any channel, is anomalous), so VisA's
multi-valued masks and anti-aliased user masks are accepted.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hgad.errors import ConfigError, InputError
from hgad.geometry import to_square

__all__ = [
    "KINDS",
    "IMAGE_EXTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGENET_NORM",
    "Norm",
    "ImageRecord",
    "Catalog",
    "parse_data_arg",
    "discover",
    "load_image",
    "load_mask",
    "preprocess",
    "list_image_files",
    "ImageDataset",
]

KINDS = ("mvtec", "visa", "btad", "mvtec3d", "folder")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 100_000_000  # larger images are refused before decoding (a 10000x10000 photo is allowed)
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own decompression-bomb guard, for any other reader

_LAYOUT_HINTS = {
    "mvtec": "MVTec AD layout <cls>/train/good/*.png",
    "btad": "BTAD layout <cls>/train/ok/*",
    "mvtec3d": "MVTec 3D-AD layout <cls>/train/good/rgb/*.png",
    "visa": "VisA layout with split_csv/1cls.csv",
    "folder": "folder layout <cls>/normal/*",
}


@dataclass(frozen=True)
class ImageRecord:
    """One image of a catalog.

    ``class_name`` is the global name (``"bottle"`` for one dataset, ``"mvtec/bottle"`` when several
    are combined) and ``class_index`` its position in :attr:`Catalog.classes`.
    """

    path: Path
    class_name: str
    class_index: int
    label: int
    mask_path: Path | None
    defect_type: str


@dataclass
class Catalog:
    """All classes of a unified data set, with one global class index.

    ``has_masks[c]`` is True when class ``c`` has anomalous test images and every one of them has
    a pixel mask (False for classes without anomalous test images: no pixel metric is possible).
    """

    classes: list[str]
    train: list[ImageRecord]
    test: list[ImageRecord]
    has_masks: dict[str, bool]

    def summary(self, *, with_test: bool = True) -> str:
        """A human-readable table: class, #train, #test good, #test anomalous, masks (``with_test=False``:
        class and #train only, for commands that read no test images)."""
        if not with_test:
            width = max(len(n) for n in [*self.classes, "class"])
            lines = [f"{'class'.ljust(width)}  train"]
            lines += [f"{n.ljust(width)}  {sum(r.class_name == n for r in self.train):5d}" for n in self.classes]
            return "\n".join([*lines, f"total ({len(self.classes)} classes): {len(self.train)} training images"])
        header = ("class", "train", "test good", "test anomalous", "masks")
        rows = []
        totals = [0, 0, 0]
        for name in self.classes:
            n_train = sum(r.class_name == name for r in self.train)
            n_good = sum(r.class_name == name and r.label == 0 for r in self.test)
            n_bad = sum(r.class_name == name and r.label == 1 for r in self.test)
            totals = [totals[0] + n_train, totals[1] + n_good, totals[2] + n_bad]
            masks = "yes" if self.has_masks.get(name, False) else "no"
            rows.append((name, str(n_train), str(n_good), str(n_bad), masks))
        rows.append((f"total ({len(self.classes)} classes)", *(str(t) for t in totals), ""))
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

        def fmt(row: Sequence[str]) -> str:
            cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, 4)]
            return "  ".join([*cells, row[4].ljust(widths[4])]).rstrip()

        return "\n".join([fmt(header), *(fmt(r) for r in rows)])

    def subset(self, classes: Sequence[str]) -> Catalog:
        """Keep the given classes, re-indexed 0..n-1 in the order given.

        A name is a global class name or, when unambiguous, the plain class name without the
        ``<dataset>/`` prefix.
        """
        aliases = {name: _default_aliases(name) for name in self.classes}
        names = _resolve_classes(classes, self.classes, aliases)
        index = {name: i for i, name in enumerate(names)}

        def keep(records: list[ImageRecord]) -> list[ImageRecord]:
            kept = [replace(r, class_index=index[r.class_name]) for r in records if r.class_name in index]
            return sorted(kept, key=lambda r: r.class_index)

        return Catalog(classes=names, train=keep(self.train), test=keep(self.test),
                       has_masks={name: self.has_masks.get(name, False) for name in names})


# ---------------------------------------------------------------------------------------------
# --data arguments and class names
# ---------------------------------------------------------------------------------------------

def parse_data_arg(arg: str) -> tuple[str, Path]:
    """Split ``"KIND:PATH"`` (e.g. ``"mvtec:/data/mvtec_ad"``) into the kind and the path."""
    kind, sep, path = arg.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        raise ConfigError("--data", f"expected KIND:PATH with KIND one of {', '.join(KINDS)}; got '{arg}'")
    if not path.strip():
        raise ConfigError("--data", f"missing dataset path in '{arg}' (expected {kind}:PATH)")
    return kind, Path(path).expanduser()


def _default_aliases(name: str) -> tuple[str, ...]:
    return (name, name.rsplit("/", 1)[-1])


def _resolve_classes(wanted: Sequence[str], known: Sequence[str],
                     aliases: dict[str, tuple[str, ...]]) -> list[str]:
    """Map user class names (global or plain) to global names, keeping the user's order."""
    if isinstance(wanted, str):
        wanted = [w for w in wanted.split(",") if w.strip()]
    out: list[str] = []
    for raw in wanted:
        name = raw.strip()
        if name in known:
            match = [name]
        else:
            match = [k for k in known if name in aliases[k]]
        if not match:
            raise ConfigError("--classes", f"unknown class '{name}'; known: {', '.join(known)}")
        if len(match) > 1:
            raise ConfigError("--classes", f"class '{name}' is ambiguous; use one of {', '.join(match)}")
        if match[0] in out:
            raise ConfigError("--classes", f"class '{name}' given twice")
        out.append(match[0])
    if not out:
        raise ConfigError("--classes", "no class given")
    return out


# ---------------------------------------------------------------------------------------------
# Layout scanners
# ---------------------------------------------------------------------------------------------

@dataclass
class _ClassScan:
    train: list[Path]
    test: list[tuple[Path, int, Path | None, str]]  # (image, label, mask, defect type)
    masks_expected: bool


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted by name); empty when it does not exist."""
    if not folder.is_dir():
        return []
    entries = list(folder.iterdir())
    for p in entries:  # a FIFO or device named like an image would hang or never end: refuse, do not skip
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.exists() and not p.is_file() \
                and not p.is_dir():
            _check_regular(p)
    return sorted((p for p in entries if _is_image(p)), key=lambda p: p.name)


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
    problem = f"no class folders with {what} found (expected {_LAYOUT_HINTS[kind]})"
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

    def scan(self, name: str, need_train: bool, need_test: bool) -> _ClassScan:
        cls = self.root / name
        train: list[Path] = []
        test: list[tuple[Path, int, Path | None, str]] = []
        if need_train:
            train = _images_in(self.train_dir(cls))
            if not train:
                problem = f"no training images (expected {_LAYOUT_HINTS[self.kind]})"
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
                        _check_pair_sizes(img, mask)
                        used.add(mask)
                    test.append((img, label, mask, defect))
                for m in masks.values():
                    if m not in used:
                        raise InputError(m, f"mask has no matching image in {folder}")
        return _ClassScan(train, test, masks_expected)


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
            raise InputError(self.csv_path, f"cannot read csv: {_short(err)}") from None
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

    def scan(self, name: str, need_train: bool, need_test: bool) -> _ClassScan:
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
                _check_pair_sizes(img, mpath)
                test.append((img, 1, mpath, "anomaly"))
        if need_train and not train:
            raise InputError(self.csv_path, f"class '{name}' has no training images")
        return _ClassScan(train, test, True)


def _no_layout_visa(root: Path) -> InputError:
    problem = f"no split_csv/1cls.csv found (expected {_LAYOUT_HINTS['visa']})"
    guess = _guess_kind(root)
    if guess is not None:
        problem += f"; it looks like the {guess} layout: use {guess}:{root}"
    return InputError(root, problem)


_LAYOUTS: dict[str, Callable[[Path], _DirLayout | _VisA]] = {
    "mvtec": _MVTec, "btad": _BTAD, "mvtec3d": _MVTec3D, "folder": _Folder, "visa": _VisA,
}


# ---------------------------------------------------------------------------------------------
# discover
# ---------------------------------------------------------------------------------------------

def _check_root(root: Path) -> None:
    if not root.exists():
        raise InputError(root, "does not exist")
    if not root.is_dir():
        raise InputError(root, "is a file; expected a dataset folder")


def _dataset_prefixes(specs: list[tuple[str, Path]]) -> list[str]:
    """Class-name prefix of each dataset: "" for one, "<kind>" or "<kind>-<root name>" for several."""
    if len(specs) == 1:
        return [""]
    kinds = [k for k, _ in specs]
    prefixes = [k if kinds.count(k) == 1 else f"{k}-{root.resolve().name}" for k, root in specs]
    for j, p in enumerate(prefixes):
        for i in range(j):
            if prefixes[i] == p:
                raise InputError(specs[j][1], f"dataset name '{p}' collides with {specs[i][1]}; "
                                              "rename one of the two folders")
    return prefixes


def discover(data: Sequence[str | tuple[str, Path]], classes: Sequence[str] | None = None, *,
             need_train: bool = True, need_test: bool = True) -> Catalog:
    """Scan one or several datasets into one :class:`Catalog` with a single global class index.

    ``data`` holds ``"KIND:PATH"`` strings or ``(kind, path)`` pairs.  With one dataset the class
    names are the plain folder/object names; with several they are ``"<kind>/<cls>"`` (or
    ``"<kind>-<root folder name>/<cls>"`` when a kind is given twice).  Classes are sorted per
    dataset and datasets kept in the order given; with ``classes`` only those are kept, in the
    order given (plain or prefixed names).

    ``need_train`` / ``need_test``: list (and check) the training / test images, else leave that
    list empty.  A class without training images is an error when ``need_train``; with
    ``need_test`` a class may lack test images but the whole catalog may not.  Anomalous test
    images are paired with their masks, and mask sizes are compared with image sizes from the file
    headers, so these errors surface before training.
    """
    if isinstance(data, str) or (isinstance(data, tuple) and len(data) == 2 and data[0] in KINDS):
        data = [data]
    specs: list[tuple[str, Path]] = []
    for item in data:
        if isinstance(item, str):
            specs.append(parse_data_arg(item))
        else:
            kind, path = item
            if kind not in KINDS:
                raise ConfigError("--data", f"unknown dataset kind '{kind}'; known kinds: {', '.join(KINDS)}")
            specs.append((kind, Path(path).expanduser()))
    if not specs:
        raise ConfigError("--data", "no dataset given (expected KIND:PATH)")
    for _, root in specs:
        _check_root(root)
    prefixes = _dataset_prefixes(specs)
    layouts = [_LAYOUTS[kind](root) for kind, root in specs]

    entries: list[tuple[str, int, str]] = []  # (global name, dataset index, plain name)
    aliases: dict[str, tuple[str, ...]] = {}
    for d, (layout, prefix) in enumerate(zip(layouts, prefixes)):
        for plain in layout.classes():
            name = f"{prefix}/{plain}" if prefix else plain
            entries.append((name, d, plain))
            aliases[name] = (name, plain, f"{specs[d][0]}/{plain}",
                             f"{specs[d][0]}-{specs[d][1].resolve().name}/{plain}")
    known = [e[0] for e in entries]
    chosen = known if classes is None else _resolve_classes(classes, known, aliases)
    where = {name: (d, plain) for name, d, plain in entries}

    train: list[ImageRecord] = []
    test: list[ImageRecord] = []
    has_masks: dict[str, bool] = {}
    for index, name in enumerate(chosen):
        d, plain = where[name]
        scan = layouts[d].scan(plain, need_train, need_test)
        train += [ImageRecord(p, name, index, 0, None, "good") for p in scan.train]
        test += [ImageRecord(p, name, index, label, mask, defect) for p, label, mask, defect in scan.test]
        anomalous = [t for t in scan.test if t[1] == 1]
        has_masks[name] = bool(anomalous) and scan.masks_expected and all(t[2] is not None for t in anomalous)
    if need_test and not test:
        raise InputError(specs[0][1], f"no test images found (expected {_LAYOUT_HINTS[specs[0][0]]} "
                                      "with test images)")
    return Catalog(classes=list(chosen), train=train, test=test, has_masks=has_masks)


# ---------------------------------------------------------------------------------------------
# Image and mask loading
# ---------------------------------------------------------------------------------------------

def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _open(path: Path) -> Image.Image:
    """Open and fully decode ``path``; every failure becomes an InputError naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        raise InputError(path, "is a folder; expected an image file")
    _check_regular(path)
    if path.stat().st_size == 0:
        raise InputError(path, "cannot read image: empty file")
    try:
        with Image.open(path) as im:
            _check_pixels(path, im.size)
            im.load()
            return im.copy()
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(path, f"cannot read image: more than {MAX_PIXELS:,} pixels") from None
    except Image.UnidentifiedImageError:
        raise InputError(path, "cannot read image: not a recognised image format") from None
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, EOFError, struct.error...
        raise InputError(path, f"cannot read image: {_short(err)}") from None


def _check_regular(path: Path) -> None:
    """Only regular files are read: a FIFO or a device would block or never end."""
    import stat

    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise InputError(path, f"cannot read image: {kind}, not a regular file")


def _check_pixels(path: Path, size: tuple[int, int]) -> None:
    """Refuse images too large to decode safely, from the header (before any pixel is decoded)."""
    w, h = size
    if w < 1 or h < 1:
        raise InputError(path, f"cannot read image: size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise InputError(path, f"cannot read image: {w}x{h} is {w * h:,} pixels, more than the limit of "
                               f"{MAX_PIXELS:,}")


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    _check_regular(path)
    if path.stat().st_size == 0:
        raise InputError(path, "cannot read image: empty file")
    try:
        with Image.open(path) as im:
            return im.size
    except Image.UnidentifiedImageError:
        raise InputError(path, "cannot read image: not a recognised image format") from None
    except Exception as err:
        raise InputError(path, f"cannot read image: {_short(err)}") from None


def _size_mismatch(mask_path: Path, mask_size: tuple[int, int], image_path: Path,
                   image_size: tuple[int, int]) -> InputError:
    return InputError(mask_path, f"mask size {mask_size[0]}x{mask_size[1]} differs from image size "
                                 f"{image_size[0]}x{image_size[1]} of {image_path}")


def _check_pair_sizes(image_path: Path, mask_path: Path) -> None:
    isize, msize = _header_size(image_path), _header_size(mask_path)
    if isize != msize:
        raise _size_mismatch(mask_path, msize, image_path, isize)


def _grey_to_uint8(im: Image.Image) -> Image.Image:
    """High-bit-depth / float grey (I;16*, I, F) to 8-bit L, scaled rather than clipped.

    16-bit modes are divided by 257 (65535 -> 255).  ``I`` and ``F`` carry no bit depth: values in
    [0, 1] (F) are taken as unit range, values up to 255 as 8-bit, up to 65535 as 16-bit, and
    anything else is min-max scaled.
    """
    arr = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16"):
        scaled = arr / 257.0
    else:
        lo, hi = float(arr.min()), float(arr.max())
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = arr
        elif lo >= 0.0 and hi <= 65535.0:
            scaled = arr / 257.0
        else:
            scaled = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: grey stacked to 3 channels, alpha dropped, palette applied."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "RGBX", "RGBa"):
        return Image.merge("RGB", im.split()[:3])
    if mode in ("P", "PA"):
        return _to_rgb(im.convert("RGBA"))
    if mode in ("LA", "La"):
        return im.getchannel("L").convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _grey_to_uint8(im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, ...


Norm = tuple[tuple[float, float, float], tuple[float, float, float]]
IMAGENET_NORM: Norm = (IMAGENET_MEAN, IMAGENET_STD)


def preprocess(img: Image.Image, img_size: int, norm: Norm, resize: str = "crop") -> torch.Tensor:
    """PIL image (any mode) -> (3, S, S) float32 tensor, normalised with ``norm = (mean, std)``.

    Made square by ``resize`` (:func:`hgad.geometry.to_square`, Lanczos; ``pad`` borders are the mean
    colour, i.e. 0 after normalisation). ``norm`` is
    the backbone's own input normalisation (``FeatureExtractor.norm``, from timm's ``pretrained_cfg``):
    EfficientNet-Lite was trained with 0.5/0.5, not ImageNet's statistics.
    """
    fill = tuple(round(255 * m) for m in norm[0])
    rgb = to_square(_to_rgb(img), img_size, resize, Image.Resampling.LANCZOS, fill)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    mean = np.asarray(norm[0], dtype=np.float32)
    std = np.asarray(norm[1], dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1)))


def load_image(path: Path, img_size: int, norm: Norm, resize: str = "crop") -> torch.Tensor:
    """Read an image file and :func:`preprocess` it; unreadable files raise InputError."""
    return preprocess(_open(path), img_size, norm, resize)


def _mask_to_binary(im: Image.Image) -> Image.Image:
    """A mask in any mode -> L image with 0 / 255 (any non-zero colour channel is anomalous)."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    arr = np.asarray(im)
    if arr.ndim == 3:
        keep = 1 if im.mode in ("LA", "La") else min(arr.shape[2], 3)  # ignore alpha
        arr = arr[..., :keep].max(axis=2)
    return Image.fromarray(np.where(arr > 0, 255, 0).astype(np.uint8), mode="L")


def _mask_tensor(im: Image.Image, size: int, resize: str = "crop") -> torch.Tensor:
    binary = to_square(_mask_to_binary(im), size, resize, Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(binary) > 0).astype(np.float32))[None]


def load_mask(path: Path, size: int, resize: str = "crop") -> torch.Tensor:
    """Read a mask file -> (1, S, S) float32 in {0, 1}.

    Non-binary masks are accepted and binarised with ``> 0``; the geometry (nearest resize of the
    shorter side, centre crop, or ``resize``) matches :func:`preprocess` so mask and image stay aligned.
    """
    return _mask_tensor(_open(path), size, resize)


def list_image_files(paths: Sequence[Path]) -> list[Path]:
    """Image files given directly or found (recursively, sorted) in the given folders.

    Used by ``hgad predict``; a missing path, a non-image file or no image at all is an InputError.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise InputError(p, "does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if _is_image(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            out += found
        elif p.suffix.lower() in IMAGE_EXTS:
            out.append(p)
        else:
            raise InputError(p, f"not an image file (expected one of {', '.join(IMAGE_EXTS)})")
    unique = list(dict.fromkeys(out))
    if not unique:
        raise InputError(Path(paths[0]) if paths else Path("."),
                         f"no image files found (extensions {', '.join(IMAGE_EXTS)})")
    return unique


class ImageDataset(torch.utils.data.Dataset):
    """Records -> dicts of tensors that the default collate batches.

    Each item: ``image`` (3, S, S), ``mask`` (1, M, M) in {0, 1} (zeros without a mask file),
    ``has_mask`` (whether ``mask`` is ground truth: normal images and anomalous images with a mask
    file), ``label``, ``class_index`` and ``index`` (position in ``records``).
    """

    def __init__(self, records: Sequence[ImageRecord], img_size: int, mask_size: int, norm: Norm,
                 resize: str = "crop") -> None:
        self.records = list(records)
        self.resize = resize
        self.img_size = img_size
        self.mask_size = mask_size
        self.norm = norm

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        im = _open(rec.path)
        if rec.mask_path is not None:
            mask_im = _open(rec.mask_path)
            if mask_im.size != im.size:
                raise _size_mismatch(rec.mask_path, mask_im.size, rec.path, im.size)
            mask = _mask_tensor(mask_im, self.mask_size, self.resize)
        else:
            mask = torch.zeros(1, self.mask_size, self.mask_size, dtype=torch.float32)
        return {
            "image": preprocess(im, self.img_size, self.norm, self.resize),
            "mask": mask,
            "has_mask": rec.mask_path is not None or rec.label == 0,
            "label": rec.label,
            "class_index": rec.class_index,
            "index": i,
        }
