"""Backbones with HSNet's feature taps, written here (no torchvision at run time).

Parameter names follow torchvision (``conv1``, ``layer3.5.bn2``, ``features.28``, ...), so a
torchvision-format state dict loads from a local path (:func:`load_backbone_weights`). The
classification heads (ResNet ``fc``, VGG ``classifier``) are not built: their keys in a
torchvision file are skipped, and :data:`HEAD_PARAMETERS` records their sizes.

Taps (HSNet, ``model/base/feature.py``):

* ResNet: every bottleneck output of layer2-4, after the residual add and before the ReLU
  (ResNet50: 4 + 6 + 3 = 13 maps; ResNet101: 4 + 23 + 3 = 30 maps).
* VGG16: ``features`` indices 17, 19, 21, 24, 26, 28, 30, i.e. conv4_1-4_3 and conv5_1-5_3
  before their ReLU, and pool5 (7 maps).

Every backbone groups its taps into three stages (``stage_sizes``, shallow to deep); HSNet's
``stack_ids`` (cumulative counts from the deep end) follow from them.

Backbones are frozen with BatchNorm in eval mode unless built with ``frozen=False``
(``resnet_tiny``, the small trainable backbone for CPU demos, is unfrozen by default).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .weights import load_fitting, read_state_dict

__all__ = [
    "Backbone",
    "ResNet",
    "VGG16",
    "build_backbone",
    "list_backbones",
    "load_backbone_weights",
    "HEAD_PARAMETERS",
]

# Parameters of the torchvision classification heads that the backbones here leave out.
HEAD_PARAMETERS = {
    "resnet50": 2048 * 1000 + 1000,  # fc
    "resnet101": 2048 * 1000 + 1000,  # fc
    "vgg16": (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000),  # classifier
}
_HEAD_PREFIXES = ("fc.", "classifier.")


class Backbone(nn.Module):
    """A feature extractor returning HSNet's taps, shallow to deep.

    Attributes:
        stage_sizes: number of taps per stage (layer2, layer3, layer4 for ResNets).
        stage_channels: channels of the taps of each stage.
        frozen: parameters without gradient and BatchNorm kept in eval mode.
    """

    stage_sizes: tuple[int, int, int]
    stage_channels: tuple[int, int, int]
    frozen: bool = True

    def taps(self, img: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def stage_size(self, size: int, stage: int) -> int:
        """Side of the maps of ``stage`` (0, 1, 2) for an input side ``size``."""
        raise NotImplementedError

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        if self.frozen:
            with torch.no_grad():
                return self.taps(img)
        return self.taps(img)

    # --- tap bookkeeping -------------------------------------------------------------------
    @property
    def stack_ids(self) -> list[int]:
        """HSNet's ``stack_ids``: cumulative tap counts from the deep end, e.g. [3, 9, 13]."""
        deep_first = list(reversed(self.stage_sizes))
        return [sum(deep_first[: i + 1]) for i in range(3)]

    @property
    def stage_taps(self) -> list[list[int]]:
        """Tap indices of each stage, e.g. [[0..3], [4..9], [10..12]] for ResNet50."""
        bounds = [0]
        for n in self.stage_sizes:
            bounds.append(bounds[-1] + n)
        return [list(range(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]

    @property
    def tap_channels(self) -> list[int]:
        return [c for c, n in zip(self.stage_channels, self.stage_sizes) for _ in range(n)]

    def freeze(self, frozen: bool = True) -> "Backbone":
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode and not self.frozen)  # frozen: BatchNorm statistics stay fixed
        return self


# ------------------------------------------------------------------------------------------
# ResNet (torchvision v1.5: stride on the 3x3 conv)
# ------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4) with identity or projection shortcut.

    ``forward`` returns the pre-ReLU sum ``bn3(conv3(...)) + shortcut``: HSNet's tap.
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return y + (x if self.downsample is None else self.downsample(x))


class ResNet(Backbone):
    """ResNet with bottleneck blocks; taps every block output of layer2-4 before its ReLU."""

    def __init__(self, layers: Sequence[int], base_width: int = 64, frozen: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = base_width
        for i, n_blocks in enumerate(layers):
            width = base_width * 2 ** i
            blocks = [Bottleneck(in_channels if j == 0 else width * 4, width, (1 if i == 0 else 2) if j == 0 else 1)
                      for j in range(n_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_channels = width * 4
        self.stage_sizes = tuple(layers[1:])
        self.stage_channels = tuple(base_width * 4 * 2 ** i for i in (1, 2, 3))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.freeze(frozen)

    def taps(self, img: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(img))))
        feats = []
        for stage, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            for block in layer:
                x = block(x)  # pre-ReLU block output
                if stage > 0:
                    feats.append(x)
                x = torch.relu(x)  # not in place: the tap keeps its pre-ReLU values
        return feats

    def stage_size(self, size: int, stage: int) -> int:
        size = math.ceil(size / 4)  # conv1 (stride 2, pad 3, k 7) and maxpool (stride 2, pad 1, k 3)
        for _ in range(stage + 1):
            size = math.ceil(size / 2)
        return size


# ------------------------------------------------------------------------------------------
# VGG16 (torchvision ``features`` indices)
# ------------------------------------------------------------------------------------------
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_VGG16_TAPS = (17, 19, 21, 24, 26, 28, 30)  # conv4_1-4_3, conv5_1-5_3 (pre-ReLU), pool5


class VGG16(Backbone):
    """VGG16 ``features`` (no BatchNorm); taps conv4_1-4_3, conv5_1-5_3 before ReLU, and pool5."""

    stage_sizes = (3, 3, 1)
    stage_channels = (512, 512, 512)

    def __init__(self, frozen: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.ReLU(inplace=False)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.freeze(frozen)

    def taps(self, img: torch.Tensor) -> list[torch.Tensor]:
        feats, x = [], img
        for i, module in enumerate(self.features):
            x = module(x)
            if i in _VGG16_TAPS:
                feats.append(x)
        return feats

    def stage_size(self, size: int, stage: int) -> int:
        return size // 8 if stage == 0 else size // 16 if stage == 1 else size // 32


# ------------------------------------------------------------------------------------------
# Registry and weights
# ------------------------------------------------------------------------------------------
_BACKBONES: dict[str, Callable[[bool], Backbone]] = {
    "resnet50": lambda frozen: ResNet((3, 4, 6, 3), frozen=frozen),
    "resnet101": lambda frozen: ResNet((3, 4, 23, 3), frozen=frozen),
    "vgg16": lambda frozen: VGG16(frozen=frozen),
    # Small trainable ResNet for CPU demos at 64-100 px: same tap structure (bottleneck outputs of
    # layer2-4, 2 + 2 + 2 taps of 128 / 256 / 512 channels), 0.87 M parameters, unfrozen.
    "resnet_tiny": lambda frozen: ResNet((1, 2, 2, 2), base_width=16, frozen=frozen),
}
_UNFROZEN_BY_DEFAULT = {"resnet_tiny"}


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def build_backbone(name: str, weights: Optional[str] = None, frozen: Optional[bool] = None) -> Backbone:
    """Build backbone ``name``; load a torchvision-format state dict from ``weights`` if given.

    ``frozen`` defaults to True, except for ``resnet_tiny`` (trained from scratch in demos).
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    if frozen is None:
        frozen = name not in _UNFROZEN_BY_DEFAULT
    backbone = _BACKBONES[name](frozen)
    backbone.name = name
    if weights is not None:
        load_backbone_weights(backbone, weights)
    return backbone


def load_backbone_weights(backbone: Backbone, path: str | os.PathLike) -> Backbone:
    """Load a torchvision-format state dict (e.g. ``resnet50-19c8e357.pth``) from ``path``.

    Classification-head keys (``fc.*``, ``classifier.*``) are skipped. A missing file, a
    missing or unexpected key, or a shape mismatch raises an error naming the file and keys.
    """
    name = f"backbone {getattr(backbone, 'name', type(backbone).__name__)}"
    return load_fitting(backbone, read_state_dict(path), os.fspath(path), name, _HEAD_PREFIXES)
