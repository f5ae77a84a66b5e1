"""Datasets and images: catalog of classes, layout scanners, image decoding, the torch dataset.

:mod:`hgad.data.catalog` (:func:`discover`, :class:`Catalog`), :mod:`hgad.data.layouts` (one scanner
per public layout), :mod:`hgad.data.images` (decode and preprocess files, no scanning) and
:mod:`hgad.data.dataset` (:class:`ImageDataset`). The names below are re-exported so that
``from hgad.data import X`` works for all of them.
"""

from hgad.data.catalog import Catalog, ImageRecord, data_record, discover, parse_data_arg
from hgad.data.dataset import ImageDataset, ImageItem
from hgad.data.images import (
    IMAGE_EXTS,
    IMAGENET_MEAN,
    IMAGENET_NORM,
    IMAGENET_STD,
    Norm,
    list_image_files,
    load_image,
    load_mask,
    open_image,
    preprocess,
)
from hgad.data.layouts import KINDS

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
    "data_record",
    "discover",
    "open_image",
    "load_image",
    "load_mask",
    "preprocess",
    "list_image_files",
    "ImageDataset",
    "ImageItem",
]
