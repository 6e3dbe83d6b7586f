"""PASCAL-5i (Shaban et al., BMVC 2017) from a VOC2012 root with SegmentationClassAug.

Fold i tests classes 5i+1..5i+5 (1-based VOC ids); training uses the other 15. With a split
list directory (HSNet's ``data/splits/pascal/{trn,val}/fold{i}.txt``, lines ``<image_id>__<class>``
with 1-based class ids) the records are read from it: ``val`` from the fold's file, ``trn`` from
the other folds' files, as HSNet does. Without one they are built from the masks themselves:
``val`` = the images of ``ImageSets/Segmentation/val.txt`` (all masks if absent), ``trn`` = the
other masks, one record per (image, split class present). Label 255 is ignore.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from .base import IGNORE_INDEX, Record, SegmentationSource
from .io import DataFileError, read_label_png, read_rgb

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
NUM_FOLDS = 4


def pascal_fold_classes(fold: int) -> list[int]:
    """Test classes of PASCAL-5i fold ``fold``: 5*fold+1 .. 5*fold+5."""
    if not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"fold must be in 0..{NUM_FOLDS - 1}, got {fold}")
    return list(range(5 * fold + 1, 5 * fold + 6))


def read_split_list(path: str) -> list[Record]:
    """Records of an HSNet split file: lines ``<image_id>__<1-based class id>``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: split list not found")
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            image_id, sep, class_id = line.rpartition("__")
            if not sep or not class_id.isdigit():
                raise DataFileError(path, f"line {line_no} is not '<image_id>__<class_id>': {line!r}")
            records.append(Record(image_id, int(class_id)))
    return records


class PascalSource(SegmentationSource):
    """PASCAL-5i split. ``root`` is the VOC2012 folder (or a folder holding ``VOC2012/``)."""

    name = "pascal"

    def __init__(self, root: str, fold: int = 0, split: str = "val", splits_dir: Optional[str] = None,
                 mask_dir: str = "SegmentationClassAug", progress: bool = True):
        if split not in ("trn", "val"):
            raise ValueError(f"split must be 'trn' or 'val', got {split!r}")
        if not os.path.isdir(os.path.join(root, "JPEGImages")) and os.path.isdir(os.path.join(root, "VOC2012")):
            root = os.path.join(root, "VOC2012")
        self.image_dir = os.path.join(root, "JPEGImages")
        self.mask_dir = os.path.join(root, mask_dir)
        for folder in (self.image_dir, self.mask_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder}: not found (expected a VOC2012 root)")
        self.root, self.fold, self.split = root, fold, split
        self.class_names = list(VOC_CLASSES)
        test = pascal_fold_classes(fold)
        self.classes = test if split == "val" else [c for c in range(1, 21) if c not in test]
        if splits_dir is not None:
            self.records = self._records_from_lists(splits_dir)
        else:
            self.records = self._records_from_masks(root, progress)

    def _records_from_lists(self, splits_dir: str) -> list[Record]:
        if os.path.isdir(os.path.join(splits_dir, "pascal")):
            splits_dir = os.path.join(splits_dir, "pascal")
        folds = [self.fold] if self.split == "val" else [f for f in range(NUM_FOLDS) if f != self.fold]
        records = []
        for fold in folds:
            records += read_split_list(os.path.join(splits_dir, self.split, f"fold{fold}.txt"))
        return records

    def _records_from_masks(self, root: str, progress: bool) -> list[Record]:
        masks = sorted(f[:-4] for f in os.listdir(self.mask_dir) if f.endswith(".png"))
        val_list = os.path.join(root, "ImageSets", "Segmentation", "val.txt")
        if os.path.isfile(val_list):
            with open(val_list) as f:
                val_ids = {line.strip() for line in f if line.strip()}
            masks = [m for m in masks if (m in val_ids) == (self.split == "val")]
        wanted = np.array(self.classes)
        records = []
        for image_id in tqdm(masks, desc=f"indexing pascal {self.split}", disable=not progress or len(masks) < 500):
            present = np.unique(read_label_png(os.path.join(self.mask_dir, image_id + ".png")))
            records += [Record(image_id, int(c)) for c in wanted[np.isin(wanted, present)]]
        return records

    def load_image(self, image_id: str) -> torch.Tensor:
        return read_rgb(os.path.join(self.image_dir, image_id + ".jpg"))

    def load_mask(self, image_id: str, class_id: int) -> torch.Tensor:
        label = torch.from_numpy(read_label_png(os.path.join(self.mask_dir, image_id + ".png")))
        mask = (label == class_id).to(torch.uint8)
        mask[label == IGNORE_INDEX] = IGNORE_INDEX
        return mask
