"""A built-in few-shot segmentation set, drawn procedurally: nothing to download.

Twenty classes, each a (shape, texture family) pair: 5 shapes (disk, square, triangle, ring, cross)
x 4 families (red stripes, green checks, blue dots, yellow diagonals). Classes are numbered
1..20 and split into 4 folds like PASCAL-5i (fold i holds classes 5i+1..5i+5); class ``k = c-1``
has shape ``k % 5`` and family ``(k % 5 + k // 5) % 4``, so every fold mixes shapes and families
and a held-out class is a new combination of parts seen in training. Each image shows one or
two objects (of different classes) with per-instance jitter on a cluttered textured background.
Everything is a pure function of ``(seed, split, fold, index)``.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .base import Record, SegmentationSource

SHAPES = ("disk", "square", "triangle", "ring", "cross")
FAMILIES = ("striped_red", "checked_green", "dotted_blue", "diagonal_yellow")
_FAMILY_COLOURS = (  # (main, alternate) RGB of each texture family
    ((215, 45, 35), (250, 160, 120)),
    ((35, 160, 55), (160, 235, 120)),
    ((35, 75, 205), (165, 205, 255)),
    ((230, 200, 35), (130, 85, 15)),
)
NUM_CLASSES = 20
NUM_FOLDS = 4
_SPLIT_CODES = {"trn": 1, "val": 2, "test": 3}


def class_parts(class_id: int) -> tuple[int, int]:
    """(shape index, family index) of synthetic class ``class_id`` in 1..20."""
    k = class_id - 1
    return k % 5, (k % 5 + k // 5) % 4


CLASS_NAMES = ["background"] + [
    f"{FAMILIES[class_parts(c)[1]]}_{SHAPES[class_parts(c)[0]]}" for c in range(1, NUM_CLASSES + 1)
]


def fold_classes(fold: int) -> list[int]:
    """The test classes of ``fold`` (PASCAL-5i convention): 5*fold+1 .. 5*fold+5."""
    if not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"fold must be in 0..{NUM_FOLDS - 1}, got {fold}")
    return list(range(5 * fold + 1, 5 * fold + 6))


class SyntheticSource(SegmentationSource):
    """Procedural few-shot set (see the module docstring).

    Args:
        fold: held-out fold 0..3.
        split: ``"trn"`` (the other folds' classes) or ``"val"``/``"test"`` (the fold's classes).
        seed: everything is deterministic given it.
        num_images: images in the split (any size; drawn lazily).
        image_size: side of the square images, in pixels.
    """

    name = "synthetic"

    def __init__(self, fold: int = 0, split: str = "val", seed: int = 0, num_images: int | None = None,
                 image_size: int = 128):
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
        held_out = fold_classes(fold)
        self.fold, self.split, self.seed, self.image_size = fold, split, seed, image_size
        self.class_names = list(CLASS_NAMES)
        self.classes = held_out if split != "trn" else [c for c in range(1, NUM_CLASSES + 1) if c not in held_out]
        self.num_images = num_images if num_images is not None else (2000 if split == "trn" else 500)
        self.records = [Record(self._image_id(i), c) for i in range(self.num_images) for c in self._layout(i)[0]]

    def _image_id(self, index: int) -> str:
        return f"{self.split}{self.fold}_{index:06d}"

    def _index(self, image_id: str) -> int:
        prefix = f"{self.split}{self.fold}_"
        if not image_id.startswith(prefix):
            raise KeyError(f"{image_id!r} is not an image of synthetic {self.split} fold {self.fold}")
        return int(image_id[len(prefix):])

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODES[self.split], self.fold, index, stream])

    def _layout(self, index: int) -> tuple[list[int], list[tuple[float, float, float, float]]]:
        """Classes of the image's objects and their (cx, cy, radius, angle), in drawing order."""
        rng = self._rng(index, 0)
        n_objects = 1 + int(rng.random() < 0.5)
        classes = [int(c) for c in rng.choice(self.classes, size=n_objects, replace=False)]
        size = self.image_size
        poses: list[tuple[float, float, float, float]] = []
        for _ in classes:
            for _attempt in range(20):
                r = rng.uniform(0.16, 0.30) * size
                cx, cy = rng.uniform(r, size - r, size=2)
                angle = rng.uniform(0, 2 * math.pi)
                if all(math.hypot(cx - x, cy - y) > 0.9 * (r + q) for x, y, q, _ in poses):
                    poses.append((cx, cy, r, angle))
                    break
            else:
                break
        return classes[: len(poses)], poses

    @functools.lru_cache(maxsize=64)
    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        classes, poses = self._layout(index)
        rng = self._rng(index, 1)
        size = self.image_size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        image = _background(rng, size, xx, yy)
        label = np.zeros((size, size), np.uint8)
        for class_id, (cx, cy, r, angle) in zip(classes, poses):
            shape, family = class_parts(class_id)
            cos, sin = math.cos(angle), math.sin(angle)
            u = ((xx - cx) * cos + (yy - cy) * sin) / r
            v = (-(xx - cx) * sin + (yy - cy) * cos) / r
            inside = _shape_mask(shape, u, v)
            texture = _texture(family, u * r, v * r, period=rng.uniform(5, 9) * size / 128)
            main, alternate = (np.array(c, np.float32) for c in _FAMILY_COLOURS[family])
            jitter = rng.uniform(0.85, 1.1) * main + rng.normal(0, 8, 3)
            colour = np.where(texture[..., None], jitter, alternate)
            image[inside] = colour[inside]
            label[inside] = class_id
        image += rng.normal(0, 6, image.shape).astype(np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), label

    def load_image(self, image_id: str) -> torch.Tensor:
        return torch.from_numpy(self._render(self._index(image_id))[0]).permute(2, 0, 1).contiguous()

    def load_mask(self, image_id: str, class_id: int) -> torch.Tensor:
        return torch.from_numpy((self._render(self._index(image_id))[1] == class_id).astype(np.uint8))

    def load_label(self, image_id: str) -> torch.Tensor:
        """The full label map (H, W) uint8 of class ids (0 background)."""
        return torch.from_numpy(self._render(self._index(image_id))[1].copy())


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho = np.hypot(u, v)
    if shape == 0:
        return rho <= 1.0
    if shape == 1:
        return np.maximum(abs(u), abs(v)) <= 0.8
    if shape == 2:  # equilateral triangle inscribed in the unit circle
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            inside &= (u * math.cos(a) + v * math.sin(a)) >= -0.5
        return inside
    if shape == 3:
        return (rho <= 1.0) & (rho >= 0.55)
    if shape == 4:
        return ((abs(u) <= 0.3) & (abs(v) <= 1.0)) | ((abs(v) <= 0.3) & (abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape}")


def _texture(family: int, x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """Boolean two-tone pattern in the object's own frame: True = main colour."""
    if family == 0:
        return (y // (period / 2)) % 2 == 0
    if family == 1:
        return ((x // period) + (y // period)) % 2 == 0
    if family == 2:
        fx, fy = (x / period) % 1 - 0.5, (y / period) % 1 - 0.5
        return np.hypot(fx, fy) > 0.3
    if family == 3:
        return ((x + y) // (period * 0.7)) % 2 == 0
    raise ValueError(f"unknown family {family}")


def _background(rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Low-saturation smooth noise, a gradient, and a few unlabeled clutter blobs."""
    grey = rng.uniform(70, 180)
    tint = rng.uniform(-25, 25, 3)
    coarse = rng.normal(0, 1, (6, 6, 3)).astype(np.float32)
    smooth = np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(size, size), mode="bicubic", align_corners=False
    )[0].permute(1, 2, 0))
    direction = rng.uniform(0, 2 * math.pi)
    gradient = ((xx * math.cos(direction) + yy * math.sin(direction)) / size - 0.5)[..., None] * rng.uniform(0, 50)
    image = grey + tint + 18 * smooth + gradient
    for _ in range(int(rng.integers(0, 4))):  # clutter: small plain ellipses of muted colours
        cx, cy = rng.uniform(0, size, 2)
        a, b = rng.uniform(0.03, 0.09, 2) * size
        blob = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        image[blob] = grey + rng.uniform(-60, 60, 3)
    return image.astype(np.float32)
