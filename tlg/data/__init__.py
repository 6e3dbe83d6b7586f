"""Datasets, episodes and support masks for few-shot segmentation.

``build_source(name, root=..., fold=..., split=...)`` gives a :class:`SegmentationSource`
("pascal", "coco", "fss", "synthetic"); :class:`EpisodeDataset` turns one into 1-way K-shot
episodes in the batch format of :mod:`tlg.data.base`.
"""
from __future__ import annotations

from typing import Optional

from .base import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, Record, SegmentationSource
from .episodes import (TEST_EPISODES, EpisodeDataset, EpisodeSampler, collate_episodes, denormalize_image,
                       normalize_image, resize_mask)
from .io import DataFileError
from .masks import (ClipGradCAM, GroundTruthMasks, PseudoMaskFiles, SupportMaskProvider, SyntheticCAM,
                    build_support_masks, pseudo_mask_path)

DATASETS = ("pascal", "coco", "fss", "synthetic")
_SPLIT_ALIASES = {"train": "trn", "trn": "trn", "val": "val", "test": "test"}


def build_source(name: str, root: Optional[str] = None, fold: int = 0, split: str = "val", **kw) -> SegmentationSource:
    """A dataset split by name. ``split`` is "trn"/"train", "val" or "test" (PASCAL and COCO
    read "test" as "val", as HSNet does). Extra keywords go to the source's constructor
    (e.g. ``splits_dir=`` for PASCAL/FSS, ``seed=``, ``num_images=``, ``image_size=`` for synthetic)."""
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_ALIASES)}, got {split!r}")
    split = _SPLIT_ALIASES[split]
    if name == "synthetic":
        from .synthetic import SyntheticSource

        return SyntheticSource(fold=fold, split=split, **kw)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (its folder on disk)")
    if name == "pascal":
        from .pascal import PascalSource

        return PascalSource(root, fold=fold, split="val" if split == "test" else split, **kw)
    if name == "coco":
        from .coco import CocoSource

        return CocoSource(root, fold=fold, split="val" if split == "test" else split, **kw)
    from .fss import FSSSource

    return FSSSource(root, fold=fold, split=split, **kw)


__all__ = [
    "build_source", "DATASETS", "SegmentationSource", "Record", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD",
    "EpisodeDataset", "EpisodeSampler", "collate_episodes", "normalize_image", "denormalize_image", "resize_mask",
    "TEST_EPISODES", "DataFileError", "SupportMaskProvider", "GroundTruthMasks", "PseudoMaskFiles", "ClipGradCAM",
    "SyntheticCAM", "build_support_masks", "pseudo_mask_path",
]
