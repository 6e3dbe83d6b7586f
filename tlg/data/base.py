"""The contract every dataset in tlg fulfils, and the batch format the models take.

A :class:`SegmentationSource` is a split of a segmentation dataset seen as (image, class) records
with per-class binary masks: what episodes are sampled from (``tlg.data.episodes``) and what
the pseudo-mask tool runs over (``tlg.clip``).

A *batch* (what ``model(batch)`` takes; HSNet's key names, plus TLG's) is a dict:

==================== ===================== =======================================================
key                  shape / type          meaning
==================== ===================== =======================================================
query_img            (B, 3, H, W) float    ImageNet-normalised query image
query_mask           (B, H, W) long        ground truth {0, 1, 255=ignore} (training, evaluation)
support_imgs         (B, K, 3, H, W) float K support images
support_masks        (B, K, H, W) float    support masks in [0, 1]: ground truth or pseudo-masks
class_id             (B,) long             class id in the source's ``class_names``
class_names          list[str] of length B class names (CLIP text guidance)
query_pseudo_mask    (B, H, W) float       optional: CLIP pseudo-mask of the query (TLG's head)
text_embeddings      (B, P, D) float       optional: precomputed prompt embeddings (TLG)
==================== ===================== =======================================================
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Record:
    """One (image, class) pair of a split: the image shows the class."""

    image_id: str
    class_id: int


class SegmentationSource(ABC):
    """A split of a segmentation dataset as (image, class) records with binary masks.

    Attributes:
        name: dataset name, e.g. ``"pascal"``.
        class_names: all class names; index = class id, index 0 is ``"background"``.
        classes: the class ids of this split (e.g. a fold's test classes).
        records: one :class:`Record` per (image, class of ``classes`` present in it).
    """

    name: str
    class_names: list[str]
    classes: list[int]
    records: list[Record]

    @abstractmethod
    def load_image(self, image_id: str) -> torch.Tensor:
        """RGB image as uint8 (3, H, W). Raises ``FileNotFoundError``/``ValueError`` naming the file."""

    @abstractmethod
    def load_mask(self, image_id: str, class_id: int) -> torch.Tensor:
        """Binary mask of ``class_id`` as uint8 (H, W): 1 object, 0 background, 255 ignore."""

    def __len__(self) -> int:
        return len(self.records)
