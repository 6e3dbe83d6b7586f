r"""IMR-HSNet: iterative mutual refinement of support and query masks from CLIP pseudo-masks
(Wang et al., "Iterative few-shot semantic segmentation from image label text", IJCAI 2022).

Starting from CLIP pseudo-masks :math:`m_s^0` (``support_masks``) and :math:`m_q^0`
(``query_pseudo_mask``), each of ``steps`` iterations (2 for PASCAL-5i, 3 for COCO-20i) runs,
for the query view (and symmetrically for the support view, with shared weights):

.. math::
    e_q = E(\mathrm{corr}(f_q, f_s \odot m_s^t)),\quad
    x = [m_q^t, e_q, \mathrm{mid}_q, h_q]\ (1 + 128 + 512 + 128 = 769\ \text{channels})

    z = \sigma(W_z x),\ r = \sigma(W_r x),\
    \tilde h = \tanh(W_h [m_q^t, e_q, \mathrm{mid}_q, r \odot h_q]),\
    h_q \leftarrow (1 - z) \odot h_q + z \odot \tilde h

    \ell_q^t = \mathrm{res}([\mathrm{decoder}(h_q + e_q), m_q^t]),\quad
    m_q^{t+1} = \mathrm{softmax}(\ell_q^t)_{fg}

:math:`E` is HSNet's 4D encoder, ``mid`` the sum of the layer3 taps resized to the layer2 size
(1x1 conv to 512 for ResNets), :math:`W_{z,r,h}` a 1x1 conv 769 -> 512 followed by two grouped
3x3 convs (256 -> 64 each, 8 groups), :math:`h` starts from a learned state (1, 128, s, s).
The loss sums query and support cross-entropy over all steps.

Module names follow the public code (Whileherham/IMR-HSNet, ``model/hsnet_imr.py``):
``state``, ``convz0-2``, ``convr0-2``, ``convh0-2``, ``conv1024_512``, ``decoder1``, ``decoder2``,
``res``, ``hpn_learner.encoder_*``. Deviation, following the paper: in the published code an
in-place list update makes the first step correlate query features masked by the support
pseudo-mask with support features masked by the query pseudo-mask; here the support side is
always masked by the support mask and the query side by the query mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from tlg import ops

from .base import FewShotSegmenter, ModelConfig, StepOutput, check_batch
from .components import HypercorrelationEncoder, apply_pseudo_mask_head, decode, make_decoder, \
    make_pseudo_mask_head, resize

STATE = 128
MID = 512


@dataclass
class IMRHSNetConfig(ModelConfig):
    """IMR-HSNet options.

    Attributes:
        steps: refinement iterations (2 for PASCAL-5i, 3 for COCO-20i).
        img_size: the square input size; sets the learned initial state to the layer2 size
            (50x50 at 400 px, as published).
    """

    steps: int = 2
    img_size: int = 400


def _gate(prefix: str, module: nn.Module, in_channels: int) -> None:
    """One GRU gate ``<prefix>0-2``: 1x1 conv 769 -> 512, two grouped 3x3 convs 256 -> 64 on its halves."""
    module.add_module(f"{prefix}0", nn.Conv2d(in_channels, MID, 1))
    module.add_module(f"{prefix}1", nn.Conv2d(MID // 2, STATE // 2, 3, padding=1, groups=8))
    module.add_module(f"{prefix}2", nn.Conv2d(MID // 2, STATE // 2, 3, padding=1, groups=8))


class IMRHSNet(FewShotSegmenter):
    """HSNet encoder + GRU-style mutual refinement of the support and query masks."""

    Config = IMRHSNetConfig
    name = "imr_hsnet"
    ignored_keys = ("hpn_learner.decoder",)  # a learner's unused decoder, if a checkpoint has one

    def __init__(self, config: IMRHSNetConfig):
        if config.steps < 1:
            raise ValueError(f"steps must be >= 1, got {config.steps}")
        super().__init__(config)
        bb = self.backbone
        self.map_size = bb.stage_size(config.img_size, 0)
        self.hpn_learner = HypercorrelationEncoder(list(reversed(bb.stage_sizes)), backend=config.backend)
        mid_channels = bb.stage_channels[1]
        if mid_channels != MID:  # ResNet50: conv1024_512
            self.add_module(f"conv{mid_channels}_{MID}", nn.Conv2d(mid_channels, MID, 1))
        self.state = nn.Parameter(torch.zeros(1, STATE, self.map_size, self.map_size))
        in_channels = 1 + STATE + MID + STATE  # 769
        for prefix in ("convz", "convr", "convh"):
            _gate(prefix, self, in_channels)
        self.decoder1, self.decoder2 = make_decoder()
        self.res = make_pseudo_mask_head()

    def check(self, batch: Mapping[str, Any]) -> tuple[int, int, int, int]:
        b, k, h, w = check_batch(batch)
        if batch.get("query_pseudo_mask") is None:
            raise KeyError("IMR-HSNet needs batch['query_pseudo_mask'] (B, H, W): the query's CLIP "
                           "pseudo-mask that the refinement starts from")
        return b, k, h, w

    def _gate(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self, f"{prefix}0")(x)
        half = y.shape[1] // 2
        return torch.cat([getattr(self, f"{prefix}1")(y[:, :half]), getattr(self, f"{prefix}2")(y[:, half:])], dim=1)

    def mid_feature(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the layer3 taps, resized to the layer2 size, 512 channels."""
        stage1 = [taps[i] for i in self.backbone.stage_taps[1]]
        mid = resize(torch.stack(stage1).sum(dim=0), taps[0].shape[-2:])
        if mid.shape[1] != MID:
            mid = getattr(self, f"conv{mid.shape[1]}_{MID}")(mid)
        return mid

    def update(self, state: torch.Tensor, mask: torch.Tensor, encoded: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        """GRU step: h <- (1 - z) h + z tanh(W_h [m, e, mid, r h])."""
        m = resize(mask.unsqueeze(1).to(encoded.dtype), encoded.shape[-2:])
        z = torch.sigmoid(self._gate("convz", torch.cat([m, encoded, mid, state], dim=1)))
        r = torch.sigmoid(self._gate("convr", torch.cat([m, encoded, mid, state], dim=1)))
        h = torch.tanh(self._gate("convh", torch.cat([m, encoded, mid, r * state], dim=1)))
        return (1 - z) * state + z * h

    def forward_shot(self, batch: Mapping[str, Any], query_taps: list[torch.Tensor],
                     support_taps: list[torch.Tensor], support_mask: torch.Tensor) -> list[StepOutput]:
        b = support_mask.shape[0]
        stack_ids, backend = self.backbone.stack_ids, self.config.backend
        query_mask = batch["query_pseudo_mask"]
        mid = torch.cat([self.mid_feature(query_taps), self.mid_feature(support_taps)])  # [query; support]
        state = None
        steps = []
        for _ in range(self.config.steps):
            corr_q = ops.multilayer_correlation(query_taps, support_taps, stack_ids, support_mask, backend=backend)
            corr_s = ops.multilayer_correlation(support_taps, query_taps, stack_ids, query_mask, backend=backend)
            encoded = self.hpn_learner([torch.cat(pair) for pair in zip(corr_q, corr_s)])  # [query; support]
            if state is None:
                state = resize(self.state, encoded.shape[-2:]).expand(2 * b, -1, -1, -1)
            masks = torch.cat([query_mask, support_mask])
            state = self.update(state, masks, encoded, mid)
            logits = apply_pseudo_mask_head(self.res, decode(self.decoder1, self.decoder2, state + encoded), masks)
            q_logits, s_logits = logits.chunk(2)
            steps.append(StepOutput(q_logits, s_logits))
            query_mask, support_mask = (l.softmax(dim=1)[:, 1] for l in (q_logits, s_logits))
        return steps

    @property
    def support_weight(self) -> float:
        return 1.0
