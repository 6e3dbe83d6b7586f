"""FSS-1000 (Li et al., CVPR 2020): one folder per class holding ``N.jpg`` images and ``N.png`` masks.

With a split directory (HSNet's ``data/splits/fss/{trn,val,test}.txt``: one class name a line)
the split's classes are read from it (HSNet: 520 / 240 / 240 classes); otherwise every class
folder is used. Class ids are 1..N over the split's classes in sorted order. Masks are grey
PNGs binarised at 128, as in HSNet. Image ids are ``<class>/<N>``.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .base import Record, SegmentationSource
from .io import read_grey, read_rgb


class FSSSource(SegmentationSource):
    """FSS-1000 split. ``root`` is the folder of class folders (or one holding ``FSS-1000/``)."""

    name = "fss"

    def __init__(self, root: str, fold: int = 0, split: str = "test", splits_dir: Optional[str] = None):
        if split not in ("trn", "val", "test"):
            raise ValueError(f"split must be 'trn', 'val' or 'test', got {split!r}")
        if os.path.isdir(os.path.join(root, "FSS-1000")):
            root = os.path.join(root, "FSS-1000")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: FSS-1000 folder not found")
        self.root, self.fold, self.split = root, fold, split
        if splits_dir is not None:
            if os.path.isdir(os.path.join(splits_dir, "fss")):
                splits_dir = os.path.join(splits_dir, "fss")
            list_file = os.path.join(splits_dir, f"{split}.txt")
            if not os.path.isfile(list_file):
                raise FileNotFoundError(f"{list_file}: split list not found")
            with open(list_file) as f:
                categories = sorted({line.strip() for line in f if line.strip()})
        else:
            categories = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.class_names = ["background"] + categories
        self.classes = list(range(1, len(categories) + 1))
        self.records = []
        for class_id, category in enumerate(categories, 1):
            folder = os.path.join(root, category)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder}: class folder not found")
            stems = sorted((f[:-4] for f in os.listdir(folder) if f.endswith(".jpg")), key=_natural)
            self.records += [Record(f"{category}/{stem}", class_id) for stem in stems]

    def load_image(self, image_id: str) -> torch.Tensor:
        return read_rgb(os.path.join(self.root, image_id + ".jpg"))

    def load_mask(self, image_id: str, class_id: int) -> torch.Tensor:
        grey = read_grey(os.path.join(self.root, image_id + ".png"))
        return torch.from_numpy((grey >= 128).astype(np.uint8))


def _natural(stem: str):
    return (0, int(stem)) if stem.isdigit() else (1, stem)
