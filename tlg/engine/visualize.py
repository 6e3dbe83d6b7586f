"""PNG panels of an episode: supports with their masks, the query with its ground truth, and the
prediction, colours blended over the images (PIL only)."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.episodes import denormalize_image

TRUTH_COLOUR = (0, 255, 0)
PREDICTION_COLOUR = (255, 0, 0)


def overlay(image: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray, colour: tuple[int, int, int],
            alpha: float = 0.5) -> Image.Image:
    """uint8 RGB image (3, H, W) or (H, W, 3) with ``mask`` (H, W; soft or binary, 255 = ignore
    drawn grey) blended in ``colour``."""
    rgb = _hwc(image)
    m = np.asarray(mask, dtype=np.float32)
    ignore = m == 255
    m = np.clip(np.where(ignore, 0, m), 0, 1)
    weight = (m * alpha)[..., None]
    out = rgb * (1 - weight) + np.array(colour, np.float32) * weight
    out[ignore] = out[ignore] * 0.5 + 64
    inside = m >= 0.5  # outline the (binarised) mask at full colour
    edge = inside & ~(np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1) & np.roll(inside, -1, 1))
    out[edge] = colour
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def spotlight(image: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray, floor: float = 0.3) -> Image.Image:
    """uint8 RGB image with everything outside a soft ``mask`` dimmed: shows a CAM-like support
    mask without hiding the object's colours."""
    rgb = _hwc(image)
    m = np.clip(np.asarray(mask, dtype=np.float32), 0, 1)[..., None]
    return Image.fromarray((rgb * (floor + (1 - floor) * m)).clip(0, 255).astype(np.uint8))


def _hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    rgb = np.asarray(image)
    if rgb.ndim == 3 and rgb.shape[0] == 3 and rgb.shape[-1] != 3:
        rgb = rgb.transpose(1, 2, 0)
    return rgb.astype(np.float32)


def episode_panel(batch: Mapping[str, Any], prediction: torch.Tensor, index: int = 0,
                  title: Optional[str] = None, min_side: int = 128) -> Image.Image:
    """One row: each support (outside its mask dimmed), the query with its ground truth (green) and
    with the prediction (red); small images are enlarged to at least ``min_side`` pixels."""
    tiles, labels = [], []
    for k, (img, mask) in enumerate(zip(batch["support_imgs"][index], batch["support_masks"][index])):
        tiles.append(spotlight(denormalize_image(img.cpu()), mask.float().cpu()))
        labels.append(f"support {k + 1} (mask lit)")
    query = denormalize_image(batch["query_img"][index].cpu())
    if "query_mask" in batch:
        tiles.append(overlay(query, batch["query_mask"][index].cpu(), TRUTH_COLOUR))
        labels.append("ground truth")
    tiles.append(overlay(query, prediction[index].float().cpu(), PREDICTION_COLOUR))
    labels.append("prediction")
    scale = max(1, -(-min_side // max(t.height for t in tiles)))
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    return _row(tiles, labels, title or str(_at(batch.get("class_names"), index) or ""))


def save_episode_panel(path: str, batch: Mapping[str, Any], prediction: torch.Tensor, index: int = 0,
                       title: Optional[str] = None) -> str:
    """Write :func:`episode_panel` to ``path`` (PNG); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    episode_panel(batch, prediction, index, title).save(path)
    return path


def stack_panels(panels: list[Image.Image]) -> Image.Image:
    """Panels one above the other."""
    width = max(p.width for p in panels)
    out = Image.new("RGB", (width, sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height
    return out


def _at(values: Any, index: int) -> Any:
    return values[index] if isinstance(values, (list, tuple)) else values


def _row(tiles: list[Image.Image], labels: list[str], title: str) -> Image.Image:
    pad, text_h = 4, 14
    h = max(t.height for t in tiles)
    width = sum(t.width for t in tiles) + pad * (len(tiles) + 1)
    out = Image.new("RGB", (width, h + 2 * text_h + 2 * pad), "white")
    draw = ImageDraw.Draw(out)
    draw.text((pad, 1), title, fill=(0, 0, 0))
    x = pad
    for tile, label in zip(tiles, labels):
        out.paste(tile, (x, text_h + pad))
        draw.text((x, text_h + pad + h + 1), label, fill=(0, 0, 0))
        x += tile.width + pad
    return out
