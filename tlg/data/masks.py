"""Support mask providers: where an episode's support masks come from.

A provider is called as ``provider(source, record, image)`` with the support's uint8 image
(3, H, W) and returns a float mask (H, W) in [0, 1] at the image's own size. Weakly-supervised
few-shot segmentation (TLG) replaces ground-truth support masks by pseudo-masks from image-level
labels (CLIP Grad-CAM); these providers make that a one-argument switch.
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .base import Record, SegmentationSource
from .io import DataFileError, read_label_png


class SupportMaskProvider(Protocol):
    def __call__(self, source: SegmentationSource, record: Record, image: torch.Tensor) -> torch.Tensor: ...


class GroundTruthMasks:
    """The dataset's own masks (ignore pixels count as background), as in fully-supervised FSS."""

    def __call__(self, source: SegmentationSource, record: Record, image: torch.Tensor) -> torch.Tensor:
        return (source.load_mask(record.image_id, record.class_id) == 1).float()


def pseudo_mask_path(directory: str, class_name: str, image_id: str) -> str:
    """The agreed pseudo-mask layout: ``<directory>/<class_name>/<image_id>.png``."""
    return os.path.join(directory, class_name, f"{image_id}.png")


class PseudoMaskFiles:
    """Pseudo-masks read from files written by ``tlg pseudo-masks``: PNGs with values 0/255 or 0/1
    (grey levels in between read as soft masks), or, where no PNG is found, its ``.pt`` files
    (``{"cam": (H, W) in [0, 1], ...}``, the soft CAM). A missing or unreadable file raises an
    error naming it."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: pseudo-mask directory not found")
        self.directory = directory

    def __call__(self, source: SegmentationSource, record: Record, image: torch.Tensor) -> torch.Tensor:
        path = pseudo_mask_path(self.directory, source.class_names[record.class_id], record.image_id)
        if not os.path.isfile(path) and os.path.isfile(path[:-4] + ".pt"):
            return self._read_pt(path[:-4] + ".pt", image)
        values = torch.from_numpy(read_label_png(path).astype(np.float32))
        if values.shape != image.shape[-2:]:
            raise DataFileError(path, f"pseudo-mask is {tuple(values.shape)}, image is {tuple(image.shape[-2:])}")
        return values / 255.0 if values.max() > 1 else values

    @staticmethod
    def _read_pt(path: str, image: torch.Tensor) -> torch.Tensor:
        try:
            cam = torch.load(path, map_location="cpu", weights_only=True)["cam"].float()
        except Exception as error:  # noqa: BLE001 - re-raised naming the file
            raise DataFileError(path, f"cannot read pseudo-mask ({error})") from error
        if cam.shape != image.shape[-2:]:
            raise DataFileError(path, f"pseudo-mask is {tuple(cam.shape)}, image is {tuple(image.shape[-2:])}")
        return cam.clamp(0, 1)


class ClipGradCAM:
    """Grad-CAM pseudo-masks computed on the fly by :mod:`tlg.clip` (when it is installed).

    Calls ``tlg.clip.gradcam.pseudo_mask(image, class_name, **options) -> (H, W) float in [0, 1]``
    (options such as ``clip_weights=``, ``arch=``; see that function).
    """

    def __init__(self, **options):
        try:
            from tlg.clip.gradcam import pseudo_mask
        except ImportError as error:  # pragma: no cover - depends on the optional CLIP stack
            raise RuntimeError(f"CLIP Grad-CAM support masks need tlg.clip.gradcam.pseudo_mask ({error})") from error
        self._pseudo_mask: Callable = pseudo_mask
        self.options = options

    def __call__(self, source: SegmentationSource, record: Record, image: torch.Tensor) -> torch.Tensor:
        mask = self._pseudo_mask(image, source.class_names[record.class_id], **self.options)
        return torch.as_tensor(mask, dtype=torch.float32).clamp(0, 1)


class SyntheticCAM:
    """A class-activation-map look-alike made from the ground truth: the object's response is
    partial (one side damped), shifted and blurred, peak-normalised to 1. Deterministic from
    ``(seed, image_id, class_id)``. Thresholded at 0.5 it is a plausible weak pseudo-mask.

    Args:
        shift: largest shift, as a fraction of the image side.
        blur: Gaussian sigma, as a fraction of the object's equivalent radius.
        damping: range of the factor applied to the damped side.
    """

    def __init__(self, seed: int = 0, shift: float = 0.08, blur: float = 0.35,
                 damping: tuple[float, float] = (0.15, 0.6), work_size: int = 64):
        self.seed, self.shift, self.blur, self.damping, self.work_size = seed, shift, blur, damping, work_size

    def __call__(self, source: SegmentationSource, record: Record, image: torch.Tensor) -> torch.Tensor:
        truth = source.load_mask(record.image_id, record.class_id)
        return self.from_mask(truth, f"{source.name}/{record.image_id}/{record.class_id}")

    def from_mask(self, truth: torch.Tensor, key: str) -> torch.Tensor:
        """The synthetic CAM of a binary mask (H, W) (255 = ignore counts as background)."""
        height, width = truth.shape
        mask = (truth == 1).float()
        if mask.sum() == 0:
            return mask
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        scale = min(1.0, self.work_size / max(height, width))
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        m = F.interpolate(mask[None, None], size=size, mode="area")[0, 0]
        ys, xs = torch.nonzero(m > 0.5, as_tuple=True) if (m > 0.5).any() else torch.nonzero(m > 0, as_tuple=True)
        cy, cx = ys.float().mean(), xs.float().mean()
        radius = math.sqrt(float(m.sum()) / math.pi)
        # partial: damp the object on one side of a random line through its centre
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = torch.meshgrid(torch.arange(size[0]).float(), torch.arange(size[1]).float(), indexing="ij")
        side = ((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)) / max(radius, 1.0)
        keep = float(rng.uniform(*self.damping))
        m = m * (keep + (1 - keep) * torch.sigmoid(4 * (side + rng.uniform(-0.3, 0.5))))
        # shifted
        dy, dx = (int(round(v)) for v in rng.uniform(-self.shift, self.shift, 2) * np.array(size))
        m = _shift(m, dy, dx)
        # blurred
        m = _gaussian_blur(m, sigma=max(0.5, self.blur * radius))
        m = m / m.max().clamp_min(1e-6)
        return F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)


def _shift(m: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(m)
    h, w = m.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = m[ys, xs]
    return out


def _gaussian_blur(m: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.conv2d(F.pad(m[None, None], (radius, radius, 0, 0), mode="constant"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="constant"), kernel.view(1, 1, -1, 1))
    return out[0, 0]


def build_support_masks(spec: str | None, seed: int = 0) -> SupportMaskProvider:
    """Provider from a short spec: ``"gt"`` (default), ``"synthetic-cam"``, ``"clip"`` or a directory
    of pseudo-mask PNGs (``"files:DIR"`` or just ``DIR``)."""
    if spec in (None, "", "gt", "ground-truth"):
        return GroundTruthMasks()
    if spec in ("synthetic-cam", "cam"):
        return SyntheticCAM(seed=seed)
    if spec == "clip":
        return ClipGradCAM()
    return PseudoMaskFiles(spec[len("files:"):] if spec.startswith("files:") else spec)


__all__ = ["SupportMaskProvider", "GroundTruthMasks", "PseudoMaskFiles", "ClipGradCAM", "SyntheticCAM",
           "pseudo_mask_path", "build_support_masks"]
