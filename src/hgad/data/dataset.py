"""The torch dataset of a catalog's images: preprocessed image, mask and labels per item."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from hgad.data.catalog import ImageRecord
from hgad.data.images import Norm, mask_tensor, open_image, preprocess, size_mismatch

__all__ = ["ImageItem", "ImageDataset"]


class ImageItem(NamedTuple):
    """One image of an :class:`ImageDataset`; the default collate batches items into an ``ImageItem`` of
    tensors with a leading batch dimension (a NamedTuple, so no custom collate is needed)."""

    image: Tensor  # (3, S, S) preprocessed
    mask: Tensor  # (1, M, M) in {0, 1}; zeros without a mask file
    has_mask: bool  # whether mask is ground truth: normal images and anomalous images with a mask file
    label: int  # 0 normal, 1 anomalous
    class_index: int
    index: int  # position in the dataset's records


class ImageDataset(torch.utils.data.Dataset):
    """Records -> :class:`ImageItem` (image, mask and labels)."""

    def __init__(self, records: Sequence[ImageRecord], img_size: int, mask_size: int, norm: Norm,
                 resize: str = "crop") -> None:
        self.records = list(records)
        self.resize = resize  # hgad.geometry mode, for image and mask alike
        self.img_size = img_size
        self.mask_size = mask_size
        self.norm = norm

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageItem:
        rec = self.records[i]
        im = open_image(rec.path)
        if rec.mask_path is not None:
            mask_im = open_image(rec.mask_path)
            if mask_im.size != im.size:
                raise size_mismatch(rec.mask_path, mask_im.size, rec.path, im.size)
            mask = mask_tensor(mask_im, self.mask_size, self.resize)
        else:
            mask = torch.zeros(1, self.mask_size, self.mask_size, dtype=torch.float32)
        return ImageItem(image=preprocess(im, self.img_size, self.norm, self.resize), mask=mask,
                         has_mask=rec.mask_path is not None or rec.label == 0, label=rec.label,
                         class_index=rec.class_index, index=i)
