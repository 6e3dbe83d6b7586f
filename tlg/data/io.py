"""File reading shared by the loaders: every failure names the file it came from."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class DataFileError(ValueError):
    """A dataset file is missing or unreadable; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path


def read_rgb(path: str) -> torch.Tensor:
    """RGB image file as uint8 (3, H, W)."""
    return torch.from_numpy(_read(path, "RGB")).permute(2, 0, 1).contiguous()


def read_label_png(path: str) -> np.ndarray:
    """Label PNG (palette or grey) as its raw indices, uint8 (H, W); palette PNGs are not converted."""
    array = _read(path, None)
    if array.ndim == 3:  # an RGB(A) label image: take one channel only if all agree
        if not (array[..., :3] == array[..., :1]).all():
            raise DataFileError(path, "label PNG is colour, expected palette or greyscale indices")
        array = array[..., 0]
    return array.astype(np.uint8, copy=False)


def read_grey(path: str) -> np.ndarray:
    """Any image file converted to 8-bit grey (PIL "L"), uint8 (H, W)."""
    return _read(path, "L")


def _read(path: str, mode: str | None) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with Image.open(path) as image:
            image.load()
            if mode is not None and image.mode != mode:
                image = image.convert(mode)
            elif mode is None and image.mode not in ("P", "L", "1", "RGB", "RGBA", "I", "I;16"):
                image = image.convert("L")
            return np.array(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataFileError(path, f"cannot read image ({error})") from error
