"""The catalog of a unified data set: every class of one or several datasets under one class index.

A unified (multi-class) model is trained on the normal images of every class at once, so all
layouts produce one :class:`Catalog` with a single global class index, whatever mix of datasets
was given. :func:`discover` checks the layout, the image/mask pairing and the mask sizes (file
headers only) and names the offending path in an :class:`~hgad.errors.InputError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hgad.data.layouts import KINDS, LAYOUT_HINTS, LAYOUTS
from hgad.errors import ConfigError, InputError

__all__ = ["ImageRecord", "Catalog", "parse_data_arg", "data_record", "discover"]


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


def parse_data_arg(arg: str) -> tuple[str, Path]:
    """Split ``"KIND:PATH"`` (e.g. ``"mvtec:/data/mvtec_ad"``) into the kind and the path."""
    kind, sep, path = arg.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        raise ConfigError("--data", f"expected KIND:PATH with KIND one of {', '.join(KINDS)}; got '{arg}'")
    if not path.strip():
        raise ConfigError("--data", f"missing dataset path in '{arg}' (expected {kind}:PATH)")
    return kind, Path(path).expanduser()


def data_record(data: Sequence[str | tuple[str, Path]]) -> list[str]:
    """``--data`` as stored in config.json: absolute paths, so the run works from any folder."""
    out = []
    for d in data:
        kind, path = parse_data_arg(d) if isinstance(d, str) else (d[0], Path(d[1]))
        out.append(f"{kind}:{Path(path).expanduser().resolve()}")
    return out


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
    layouts = [LAYOUTS[kind](root) for kind, root in specs]

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
        raise InputError(specs[0][1], f"no test images found (expected {LAYOUT_HINTS[specs[0][0]]} "
                                      "with test images)")
    return Catalog(classes=list(chosen), train=train, test=test, has_masks=has_masks)
