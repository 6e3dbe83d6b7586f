"""Grad-CAM of CLIP image-text scores: coarse object maps from image-level labels.

Grad-CAM (Selvaraju et al., ICCV 2017) on CLIP as in IMR-HSNet (paper 001, sec. 4.1): the text embedding
``t_c`` of class c acts as a classifier weight, the target is the image-text score

    s_c = tau * cos(f_v, t_c)                                            (plain)
    s_c = softmax_j(tau * cos(f_v, t_j))[c],  j in {c} + competitors      (softmax)

where the competitors are the other labelled classes of the image and background prompts (paper 002),
``tau`` = CLIP's logit scale. With activations ``A`` (C, h, w) of the chosen layer,

    alpha_k = mean_{i,j} ds_c / dA_k(i,j),     CAM = ReLU(sum_k alpha_k A_k),

(``mode="gradcam"``, the default) or the element-wise variant ``CAM(i,j) = ReLU(sum_k ds_c/dA_k(i,j) A_k(i,j))``
(``mode="hirescam"``, Draelos & Carin 2020), which keeps the gradient's spatial layout;

normalised by its maximum to [0, 1] and bilinearly upsampled to the image size.

Layers: RN50 = output of the last stage (``layer4``, before the attention pool); ViT = the patch tokens
entering the last transformer block (the output tokens would carry no gradient: only the class token of the
last block is read out).

Geometry: the *whole* image is resized to ``input_size`` x ``input_size`` (no crop; aspect ratio not kept),
so the CAM grid covers the full image and maps back by plain resizing. At a non-native ``input_size`` the
positional embeddings (ViT tokens, RN50 attention pool) are interpolated bicubically.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .model import ClipModel

__all__ = ["ClipCamEncoder", "gradcam", "prepare_images", "upsample_cams", "compute_cams", "pseudo_mask"]

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _resize_grid_embedding(pos: torch.Tensor, size: tuple[int, int], extra: int = 1) -> torch.Tensor:
    """(extra + s*s, C) positional embedding -> (extra + h*w, C), grid part resized bicubically."""
    head, grid = pos[:extra], pos[extra:]
    side = int(round(math.sqrt(grid.shape[0])))
    if (side, side) == tuple(size):
        return pos
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
    return torch.cat([head, grid.permute(0, 2, 3, 1).reshape(size[0] * size[1], -1)], dim=0)


class ClipCamEncoder:
    """``images -> (image embedding (B, D), activations (B, C, h, w))`` for an open_clip CLIP, the
    activations being part of the graph (see the module docstring for which layer)."""

    def __init__(self, clip: ClipModel):
        self.clip = clip
        self.visual = clip.model.visual

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._vit(images) if self.clip.is_vit else self._resnet(images)

    def _resnet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        with torch.no_grad():  # nothing before the CAM layer needs a graph
            x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        acts = x = x.detach().requires_grad_(True)
        pool = v.attnpool
        b, c, h, w = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)  # (hw, B, C)
        tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
        tokens = tokens + _resize_grid_embedding(pool.positional_embedding, (h, w))[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=tokens[:1], key=tokens, value=tokens, embed_dim_to_check=c, num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False,
        )
        return out[0], acts

    def _vit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, "batch_first", True)
        with torch.no_grad():  # nothing before the CAM layer needs a graph
            x = v.conv1(x)  # (B, W, gh, gw)
            b, width, gh, gw = x.shape
            x = x.flatten(2).transpose(1, 2)
            cls = v.class_embedding.to(x.dtype).expand(b, 1, -1)
            x = torch.cat([cls, x], dim=1) + _resize_grid_embedding(v.positional_embedding, (gh, gw)).to(x.dtype)
            x = v.ln_pre(v.patch_dropout(x))
            x = x if batch_first else x.transpose(0, 1)
            for block in blocks[:-1]:
                x = block(x)
            x = x if batch_first else x.transpose(0, 1)
        # the CAM layer: patch tokens entering the last block, as a (B, W, gh, gw) leaf of the graph
        acts = x[:, 1:].transpose(1, 2).reshape(b, width, gh, gw).detach().requires_grad_(True)
        x = torch.cat([x[:, :1], acts.flatten(2).transpose(1, 2)], dim=1)
        x = x if batch_first else x.transpose(0, 1)
        x = blocks[-1](x)
        x = x if batch_first else x.transpose(0, 1)
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled, acts


def gradcam(
    encoder: Encoder,
    images: torch.Tensor,
    targets: torch.Tensor,
    competitors: Sequence[torch.Tensor | None] | None = None,
    *,
    logit_scale: float = 100.0,
    softmax: bool = True,
    mode: str = "gradcam",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps (B, h, w) >= 0 (unnormalised) and the scores (B,) (see the module docstring).

    Args:
        encoder: ``images -> (embedding (B, D), activations (B, C, h, w))``.
        images: (B, 3, S, S) preprocessed images.
        targets: (B, D) normalised text embedding of each image's target class.
        competitors: per image, None or (K_b, D) normalised embeddings competing in the softmax.
        logit_scale: tau.
        softmax: score = softmax probability of the target among target + competitors, else the logit.
        mode: ``"gradcam"`` (channel weights = spatially averaged gradients) or ``"hirescam"`` (element-wise).
    """
    if mode not in ("gradcam", "hirescam"):
        raise ValueError(f"mode must be 'gradcam' or 'hirescam', got {mode!r}")
    with torch.enable_grad():
        # a graph must reach the activations even for encoders without trainable parameters
        embedding, acts = encoder(images.detach().requires_grad_(True))
        embedding = F.normalize(embedding.float(), dim=-1)
        scores = []
        for b in range(images.shape[0]):
            texts = targets[b:b + 1]
            others = None if competitors is None else competitors[b]
            if others is not None and others.numel():
                texts = torch.cat([texts, others.to(texts)], dim=0)
            logits = logit_scale * embedding[b] @ texts.T
            scores.append(logits.softmax(dim=-1)[0] if softmax and texts.shape[0] > 1 else logits[0])
        scores = torch.stack(scores)
        (grads,) = torch.autograd.grad(scores.sum(), acts)  # per-sample: samples do not interact
    weights = grads.mean(dim=(2, 3), keepdim=True) if mode == "gradcam" else grads  # alpha_k
    cams = F.relu((weights * acts.detach()).sum(dim=1))
    return cams.detach(), scores.detach()


def prepare_images(images: Sequence[torch.Tensor], size: int, mean: Sequence[float],
                   std: Sequence[float]) -> torch.Tensor:
    """uint8 (3, H, W) images -> (B, 3, size, size) float, the whole image resized (no crop), normalised."""
    out = []
    for img in images:
        x = img.float().div(255.0)[None]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x[0])
    x = torch.stack(out)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def upsample_cams(cams: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """(B, h, w) CAMs -> per image (H, W) float in [0, 1]: bilinearly resized, then max-normalised."""
    out = []
    for cam, size in zip(cams, sizes):
        cam = F.interpolate(cam[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
        out.append((cam / cam.max().clamp_min(1e-12)).clamp(0, 1))
    return out


def compute_cams(
    clip: ClipModel,
    images: Sequence[torch.Tensor],
    class_names: Sequence[str],
    other_classes: Sequence[Sequence[str]] | None = None,
    *,
    background: bool = True,
    softmax: bool = True,
    input_size: int | None = None,
    batch_size: int = 8,
    cache_dir=None,
    logit_scale: float | None = None,
    mode: str = "gradcam",
) -> list[torch.Tensor]:
    """Soft CAMs (H, W) in [0, 1], one per (image, class name) pair, batched by ``batch_size``.

    ``other_classes[i]``: the other labelled classes of image i, competing in the softmax beside the
    background prompts of ``class_names[i]`` (``background=True``).
    """
    from .text import background_embeddings, class_embeddings

    size = input_size or clip.image_size
    encoder = ClipCamEncoder(clip)
    tau = float(clip.model.logit_scale.exp()) if logit_scale is None else logit_scale
    names = sorted(set(class_names) | {n for group in (other_classes or []) for n in group})
    table = dict(zip(names, class_embeddings(clip, names, cache_dir=cache_dir)))
    bg = {n: background_embeddings(clip, n, cache_dir=cache_dir) for n in set(class_names)} if background else {}
    device = next(clip.model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        idx = range(start, min(start + batch_size, len(images)))
        batch = prepare_images([images[i] for i in idx], size, clip.mean, clip.std).to(device)
        targets = torch.stack([table[class_names[i]] for i in idx]).to(device)
        comps = []
        for i in idx:
            parts = [table[n][None] for n in (other_classes[i] if other_classes else []) if n != class_names[i]]
            if background:
                parts.append(bg[class_names[i]])
            comps.append(torch.cat(parts).to(device) if parts else None)
        cams, _ = gradcam(encoder, batch, targets, comps, logit_scale=tau, softmax=softmax, mode=mode)
        out.extend(upsample_cams(cams.cpu(), [tuple(images[i].shape[-2:]) for i in idx]))
    return out


_LOADED: dict[tuple[str, str], ClipModel] = {}


def pseudo_mask(image: torch.Tensor, class_name: str, *, clip: ClipModel | None = None,
                clip_weights: str | None = None, arch: str = "auto", threshold: float | None = None,
                **options) -> torch.Tensor:
    """CLIP Grad-CAM pseudo-mask of one uint8 image (3, H, W) for ``class_name``: soft (H, W) in [0, 1],
    or binary float if ``threshold`` is given. The model is ``clip`` or loaded (once) from ``clip_weights``
    (default ``$TLG_CLIP_WEIGHTS``; ``arch="auto"`` tells RN50 / ViT-B/16 / ViT-B/32 from the weights).
    Used by ``tlg.data.masks.ClipGradCAM`` and ``tlg predict``."""
    if clip is None:
        import os

        from .model import load_clip

        path = clip_weights or os.environ.get("TLG_CLIP_WEIGHTS")
        if not path:
            raise ValueError("pseudo_mask needs clip= or clip_weights= (or $TLG_CLIP_WEIGHTS): a local CLIP file")
        key = (str(path), arch)
        if key not in _LOADED:
            _LOADED[key] = load_clip(path, arch)
        clip = _LOADED[key]
    cam = compute_cams(clip, [image], [class_name], **options)[0]
    return cam if threshold is None else (cam >= threshold).float()
