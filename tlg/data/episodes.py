"""1-way K-shot episodes over a :class:`~tlg.data.base.SegmentationSource`.

Follows HSNet's protocol (Min et al., ICCV 2021; github.com/juhongm999/hsnet, ``data/pascal.py``):
episode ``i`` takes query record ``i mod len(records)``; its K supports are other images of the
same class (never the query image); a test run is 1000 episodes cycling the fold's records.
Every episode is a pure function of ``(seed, epoch, i)``, so results do not depend on the
number of workers or processes, and a resumed run sees the same episodes.
"""
from __future__ import annotations

import collections
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from .base import IMAGENET_MEAN, IMAGENET_STD, Record, SegmentationSource
from .io import DataFileError
from .masks import GroundTruthMasks, SupportMaskProvider

TEST_EPISODES = 1000  # HSNet's test protocol: 1000 episodes per fold


def normalize_image(image: torch.Tensor, size: Optional[int | tuple[int, int]]) -> torch.Tensor:
    """uint8 (3, H, W) -> float (3, h, w) resized (bilinear, antialiased) and ImageNet-normalised."""
    x = image.float().div(255)[None]
    if size is not None:
        x = F.interpolate(x, size=_pair(size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


def denormalize_image(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_image` (without the resize): float (3, H, W) -> uint8."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image.float() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def resize_mask(mask: torch.Tensor, size: Optional[int | tuple[int, int]], soft: bool = False) -> torch.Tensor:
    """Nearest-neighbour resize of a label mask (bilinear for soft masks), keeping the dtype."""
    if size is None or tuple(mask.shape[-2:]) == _pair(size):
        return mask
    mode = "bilinear" if soft else "nearest"
    kwargs = {"align_corners": False} if soft else {}
    out = F.interpolate(mask[None, None].float(), size=_pair(size), mode=mode, **kwargs)[0, 0]
    return out if soft else out.round().to(mask.dtype)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class EpisodeDataset(Dataset):
    """Episodes as batch dicts (see :mod:`tlg.data.base`), one per index.

    Args:
        source: the split to draw from.
        shot: K supports per episode.
        size: side (or (h, w)) images and masks are resized to; ``None`` keeps them (shot 1, batch 1).
        episodes: number of episodes; ``None`` = one per record (training), HSNet tests use 1000.
        seed: episode sampling seed.
        support_masks: provider of support masks (ground truth by default).
        query_pseudo_masks: optional provider of ``query_pseudo_mask`` (TLG's head, baselines).
        keep_original: also return ``org_query_mask`` (query mask at the image's own size) for
            evaluation at original resolution.
        text_embeddings: optional class name -> (P, D) tensor of prompt embeddings (``tlg.clip``),
            returned as ``text_embeddings`` (TLG's CLIP guidance).
        on_error: ``"raise"`` (an error naming the file) or ``"skip"``: move on to the next query
            and count the file in ``skipped`` (counted in the loading process: use ``num_workers=0``
            to read the counts back).
    """

    def __init__(self, source: SegmentationSource, shot: int = 1, size: Optional[int | tuple[int, int]] = 400,
                 episodes: Optional[int] = None, seed: int = 0, support_masks: Optional[SupportMaskProvider] = None,
                 query_pseudo_masks: Optional[SupportMaskProvider] = None, keep_original: bool = False,
                 text_embeddings: Optional[Mapping[str, torch.Tensor]] = None, on_error: str = "raise"):
        if shot < 1:
            raise ValueError(f"shot must be >= 1, got {shot}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if len(source.records) == 0:
            raise ValueError(f"{source.name}: the split has no records")
        self.source, self.shot, self.size, self.seed = source, shot, size, seed
        self.episodes = episodes if episodes is not None else len(source.records)
        self.support_masks = support_masks or GroundTruthMasks()
        self.query_pseudo_masks = query_pseudo_masks
        self.keep_original, self.on_error = keep_original, on_error
        self.text_embeddings = text_embeddings
        if text_embeddings is not None:
            missing = sorted({source.class_names[c] for c in source.classes} - set(text_embeddings))
            if missing:
                raise KeyError(f"text_embeddings lack class(es) {missing[:5]} of {source.name}")
        self.epoch = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.images_of_class: dict[int, list[str]] = collections.defaultdict(list)
        for record in source.records:
            self.images_of_class[record.class_id].append(record.image_id)

    def set_epoch(self, epoch: int) -> None:
        """Training draws new supports every epoch; evaluation keeps epoch 0."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.episodes

    def sample(self, index: int) -> tuple[Record, list[Record]]:
        """The query record and K support records of episode ``index``."""
        records = self.source.records
        query = records[index % len(records)]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        candidates = sorted(set(self.images_of_class[query.class_id]) - {query.image_id})
        if not candidates:
            raise ValueError(f"{self.source.name}: class {self.source.class_names[query.class_id]!r} has a single "
                             f"image ({query.image_id}); no support can differ from the query")
        picks = rng.choice(len(candidates), size=self.shot, replace=len(candidates) < self.shot)
        return query, [Record(candidates[int(i)], query.class_id) for i in picks]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        for attempt in range(len(self.source.records)):
            try:
                return self._episode(index + attempt)
            except (FileNotFoundError, DataFileError) as error:
                if self.on_error == "raise":
                    raise
                self.skipped[getattr(error, "path", None) or str(error)] += 1
        raise RuntimeError(f"{self.source.name}: every episode failed to load")

    def _episode(self, index: int) -> dict[str, Any]:
        query, supports = self.sample(index)
        source = self.source
        query_image = source.load_image(query.image_id)
        query_mask = source.load_mask(query.image_id, query.class_id)
        _check_same_size(query_image, query_mask, query.image_id)
        support_imgs, support_masks = [], []
        for record in supports:
            image = source.load_image(record.image_id)
            mask = self.support_masks(source, record, image)
            _check_same_size(image, mask, record.image_id)
            support_imgs.append(normalize_image(image, self.size))
            support_masks.append(resize_mask(mask.float(), self.size, soft=True))
        episode: dict[str, Any] = {
            "query_img": normalize_image(query_image, self.size),
            "query_mask": resize_mask(query_mask, self.size).long(),
            "support_imgs": torch.stack(support_imgs),
            "support_masks": torch.stack(support_masks),
            "class_id": torch.tensor(query.class_id),
            "class_names": source.class_names[query.class_id],
            "query_name": query.image_id,
            "support_names": [r.image_id for r in supports],
            "episode": torch.tensor(index),
        }
        if self.query_pseudo_masks is not None:
            pseudo = self.query_pseudo_masks(source, query, query_image)
            episode["query_pseudo_mask"] = resize_mask(pseudo.float(), self.size, soft=True)
        if self.text_embeddings is not None:
            episode["text_embeddings"] = torch.as_tensor(self.text_embeddings[source.class_names[query.class_id]]).float()
        if self.keep_original:
            episode["org_query_mask"] = query_mask.long()
        return episode


def _check_same_size(image: torch.Tensor, mask: torch.Tensor, image_id: str) -> None:
    if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
        raise DataFileError(image_id, f"mask {tuple(mask.shape)} does not match image {tuple(image.shape[-2:])}")


def collate_episodes(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader collate: stacks same-shaped tensors, keeps strings and ragged tensors
    (``org_query_mask``) as lists."""
    batch: dict[str, Any] = {}
    for key in episodes[0]:
        values = [e[key] for e in episodes]
        same_shape = all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1
        batch[key] = torch.stack(values) if same_shape and key != "org_query_mask" else values
    return batch


class EpisodeSampler(Sampler[int]):
    """Episode indices, optionally shuffled per epoch and sharded over ``world_size`` processes.

    Training (``pad=True``) pads by wrapping around so every process gets the same number of
    indices (DistributedDataParallel needs equal step counts); evaluation (``pad=False``)
    shards ``i = rank, rank + world, ...`` so each episode is seen exactly once overall.
    """

    def __init__(self, length: int, *, shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool = True):
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self):
        order = self._order()
        if self.pad and self.world_size > 1:
            total = -(-self.length // self.world_size) * self.world_size
            order = (order * (total // max(1, len(order)) + 1))[:total]
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        if self.pad:
            return -(-self.length // self.world_size)
        return len(range(self.rank, self.length, self.world_size))
