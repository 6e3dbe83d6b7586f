"""Parts shared by HSNet, TLG and IMR-HSNet: the 4D encoder, the decoder, the pseudo-mask head.

Reference: Min et al., "Hypercorrelation Squeeze for Few-Shot Segmentation", ICCV 2021
(``model/learner.py`` of juhongm999/hsnet for the layer sizes and module names).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tlg import ops

__all__ = [
    "squeeze_block",
    "HypercorrelationEncoder",
    "HPNLearner",
    "make_decoder",
    "decode",
    "make_pseudo_mask_head",
    "apply_pseudo_mask_head",
    "resize",
]

ENCODER_CHANNELS = (16, 64, 128)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) with align_corners=True (HSNet's convention)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def squeeze_block(in_channels: int, out_channels: Sequence[int], kernels: Sequence[int],
                  support_strides: Sequence[int], backend: str = "auto", groups: int = 4) -> nn.Sequential:
    """[CenterPivotConv4d -> GroupNorm(4) -> ReLU] x len(out_channels) (HSNet's building block).

    GroupNorm and ReLU run as one op (:class:`tlg.ops.GroupNormReLU`); an ``nn.Identity`` keeps the
    ReLU's place, so the modules keep HSNet's indices and its checkpoints' keys."""
    layers: list[nn.Module] = []
    for cin, cout, k, s in zip([in_channels, *out_channels[:-1]], out_channels, kernels, support_strides):
        layers += [ops.CenterPivotConv4d(cin, cout, (k,) * 4, (1, 1, s, s), (k // 2,) * 4, backend=backend),
                   ops.GroupNormReLU(groups, cout, backend=backend), nn.Identity()]
    return nn.Sequential(*layers)


class HypercorrelationEncoder(nn.Module):
    r"""HSNet's 4D encoder: squeeze each correlation stack, mix deep to shallow, average support dims.

    .. math::
        z_4 = E_4(C_4),\ z_3 = E_3(C_3),\ z_2 = E_2(C_2),\quad
        z_{43} = M_{43}(\uparrow z_4 + z_3),\ z_{432} = M_{32}(\uparrow z_{43} + z_2),\quad
        y = \operatorname{mean}_{h_s, w_s} z_{432}

    ``\uparrow`` resizes the query dims (bilinear). Squeezing blocks: out channels 16, 64, 128;
    kernels [3,3,3], [5,3,3], [5,5,3]; support strides [2,2,2], [4,2,2], [4,4,2]. Mixing blocks:
    128 channels, kernel 3, stride 1.

    Args:
        in_channels: layers per stack, deepest first (ResNet50: [3, 6, 4]).
    Input: ``[C_4, C_3, C_2]``, each (B, L, Hq, Wq, Hs, Ws). Output: (B, 128, Hq2, Wq2).
    """

    def __init__(self, in_channels: Sequence[int], backend: str = "auto"):
        super().__init__()
        c1, c2, c3 = ENCODER_CHANNELS
        self.encoder_layer4 = squeeze_block(in_channels[0], [c1, c2, c3], [3, 3, 3], [2, 2, 2], backend)
        self.encoder_layer3 = squeeze_block(in_channels[1], [c1, c2, c3], [5, 3, 3], [4, 2, 2], backend)
        self.encoder_layer2 = squeeze_block(in_channels[2], [c1, c2, c3], [5, 5, 3], [4, 4, 2], backend)
        self.encoder_layer4to3 = squeeze_block(c3, [c3] * 3, [3, 3, 3], [1, 1, 1], backend)
        self.encoder_layer3to2 = squeeze_block(c3, [c3] * 3, [3, 3, 3], [1, 1, 1], backend)

    @staticmethod
    def resize_query_dims(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Resize (Ha, Wa) of ``x`` (B, C, Ha, Wa, Hb, Wb) to those of ``like``; (Hb, Wb) too if they differ.

        x's memory is (B C, Ha, Wa, Hb Wb): a channels-last (B C, Hb Wb, Ha, Wa) image batch, which the
        bilinear kernel reads and writes in that layout, so no permuted copies go in or come out.
        """
        b, c, ha, wa, hb, wb = x.shape
        (ta, tw), (tb, twb) = like.shape[2:4], like.shape[4:6]
        if (ha, wa) != (ta, tw):
            y = resize(x.reshape(b * c, ha, wa, hb * wb).permute(0, 3, 1, 2), (ta, tw))
            x = y.permute(0, 2, 3, 1).reshape(b, c, ta, tw, hb, wb)
        if (hb, wb) != (tb, twb):  # only at unusual input sizes; HSNet's sizes always agree here
            x = resize(x.reshape(b, c * ta * tw, hb, wb), (tb, twb)).reshape(b, c, ta, tw, tb, twb)
        return x.contiguous()

    def encode(self, corr_pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        z4 = self.encoder_layer4(corr_pyramid[0])
        z3 = self.encoder_layer3(corr_pyramid[1])
        z2 = self.encoder_layer2(corr_pyramid[2])
        z43 = self.encoder_layer4to3(self.resize_query_dims(z4, z3) + z3)
        z432 = self.encoder_layer3to2(self.resize_query_dims(z43, z2) + z2)
        return z432.flatten(-2).mean(dim=-1)

    def forward(self, corr_pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.encode(corr_pyramid)


def make_decoder() -> tuple[nn.Sequential, nn.Sequential]:
    """HSNet's decoder: ``decoder1`` (128 -> 128 -> 64, 3x3, ReLU), ``decoder2`` (64 -> 64 -> 2)."""
    _, c2, c3 = ENCODER_CHANNELS
    decoder1 = nn.Sequential(nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(), nn.Conv2d(c3, c2, 3, padding=1), nn.ReLU())
    decoder2 = nn.Sequential(nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.Conv2d(c2, 2, 3, padding=1))
    return decoder1, decoder2


def decode(decoder1: nn.Module, decoder2: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """decoder1 -> 2x bilinear upsampling -> decoder2: (B, 128, h, w) -> (B, 2, 2h, 2w) logits."""
    y = decoder1(x)
    return decoder2(resize(y, (2 * y.shape[-2], 2 * y.shape[-1])))


class HPNLearner(HypercorrelationEncoder):
    """HSNet's learner: the 4D encoder and the decoder, named as in HSNet checkpoints
    (``hpn_learner.encoder_layer4.0.conv1.weight``, ``hpn_learner.decoder1.0.weight``, ...)."""

    def __init__(self, in_channels: Sequence[int], backend: str = "auto"):
        super().__init__(in_channels, backend)
        self.decoder1, self.decoder2 = make_decoder()

    def forward(self, corr_pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        return decode(self.decoder1, self.decoder2, self.encode(corr_pyramid))


def make_pseudo_mask_head() -> nn.Sequential:
    """IMR-HSNet / TLG head: [logits (2), pseudo-mask (1)] -> 1x1 conv 10 -> GELU -> 1x1 conv 2."""
    return nn.Sequential(nn.Conv2d(3, 10, 1), nn.GELU(), nn.Conv2d(10, 2, 1))


def apply_pseudo_mask_head(head: nn.Module, logits: torch.Tensor, pseudo_mask: torch.Tensor) -> torch.Tensor:
    """``head(cat[logits, pseudo_mask resized to the logits])``; pseudo_mask is (B, H, W) or (B, 1, H, W)."""
    m = pseudo_mask if pseudo_mask.dim() == 4 else pseudo_mask.unsqueeze(1)
    return head(torch.cat([logits, resize(m.to(logits.dtype), logits.shape[-2:])], dim=1))
