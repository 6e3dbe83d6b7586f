"""COCO-20i (Nguyen & Todorovic, ICCV 2019) from a COCO 2014 root, read with pycocotools.

The 80 categories are numbered 1..80 in increasing COCO category id. Folds interleave as in
HSNet (``data/coco.py``): fold i tests classes i+1, i+5, ..., i+77 and trains on the other 60.
``trn`` reads ``annotations/instances_train2014.json`` and ``train2014/``; ``val`` the val2014
pair. A class mask is the union of its non-crowd instances (polygons or RLE); pixels covered
only by crowd annotations of the class are ignore (255).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .base import IGNORE_INDEX, Record, SegmentationSource
from .io import read_rgb

NUM_FOLDS = 4


def coco_fold_classes(fold: int) -> list[int]:
    """Test classes of COCO-20i fold ``fold`` (1-based): fold+1, fold+5, ..., fold+77."""
    if not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"fold must be in 0..{NUM_FOLDS - 1}, got {fold}")
    return [fold + 1 + NUM_FOLDS * k for k in range(20)]


class CocoSource(SegmentationSource):
    """COCO-20i split. ``root`` holds ``annotations/`` and ``train2014/``/``val2014/``."""

    name = "coco"

    def __init__(self, root: str, fold: int = 0, split: str = "val", year: str = "2014"):
        from pycocotools.coco import COCO

        if split not in ("trn", "val"):
            raise ValueError(f"split must be 'trn' or 'val', got {split!r}")
        subset = ("train" if split == "trn" else "val") + year
        annotation_file = os.path.join(root, "annotations", f"instances_{subset}.json")
        if not os.path.isfile(annotation_file):
            raise FileNotFoundError(f"{annotation_file}: COCO annotation file not found")
        self.root, self.fold, self.split, self.image_dir = root, fold, split, os.path.join(root, subset)
        self.coco = COCO(annotation_file)
        category_ids = sorted(self.coco.getCatIds())
        self.category_of_class = {i + 1: cat for i, cat in enumerate(category_ids)}
        self.class_of_category = {cat: i for i, cat in self.category_of_class.items()}
        self.class_names = ["background"] + [self.coco.loadCats(c)[0]["name"] for c in category_ids]
        test = [c for c in coco_fold_classes(fold) if c < len(self.class_names)]
        self.classes = test if split == "val" else [c for c in range(1, len(self.class_names)) if c not in test]
        wanted = set(self.classes)
        self._image_of_id: dict[str, dict] = {}
        records = set()
        for ann in self.coco.dataset.get("annotations", []):
            class_id = self.class_of_category.get(ann["category_id"])
            if class_id in wanted and not ann.get("iscrowd", 0):
                info = self.coco.imgs[ann["image_id"]]
                image_id = os.path.splitext(info["file_name"])[0]
                self._image_of_id[image_id] = info
                records.add(Record(image_id, class_id))
        self.records = sorted(records, key=lambda r: (r.image_id, r.class_id))

    def _info(self, image_id: str) -> dict:
        if image_id not in self._image_of_id:
            raise KeyError(f"{image_id!r} is not an image of COCO {self.split} fold {self.fold}")
        return self._image_of_id[image_id]

    def load_image(self, image_id: str) -> torch.Tensor:
        return read_rgb(os.path.join(self.image_dir, self._info(image_id)["file_name"]))

    def load_mask(self, image_id: str, class_id: int) -> torch.Tensor:
        info = self._info(image_id)
        ann_ids = self.coco.getAnnIds(imgIds=info["id"], catIds=[self.category_of_class[class_id]], iscrowd=None)
        mask = np.zeros((info["height"], info["width"]), np.uint8)
        crowd = np.zeros_like(mask, dtype=bool)
        for ann in self.coco.loadAnns(ann_ids):
            area = self.coco.annToMask(ann).astype(bool)  # polygons, RLE and uncompressed RLE
            if ann.get("iscrowd", 0):
                crowd |= area
            else:
                mask[area] = 1
        mask[crowd & (mask == 0)] = IGNORE_INDEX
        return torch.from_numpy(mask)
