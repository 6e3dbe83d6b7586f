"""HSNet: Hypercorrelation Squeeze Networks (Min, Lee, Cho; ICCV 2021).

.. math::
    C^l = \\operatorname{ReLU}(\\cos(f^l_q, f^l_s \\odot m_s)),\\quad
    \\hat y = \\operatorname{decoder}(\\operatorname{encoder}_{4D}([C^{l_4}], [C^{l_3}], [C^{l_2}]))

Module names follow the public checkpoints (juhongm999/hsnet): ``backbone.*`` (torchvision
names) and ``hpn_learner.{encoder_layer4,3,2,4to3,3to2,decoder1,decoder2}.*``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from tlg import ops

from .base import FewShotSegmenter, ModelConfig, StepOutput
from .components import HPNLearner


@dataclass
class HSNetConfig(ModelConfig):
    """HSNet options: those of :class:`~tlg.models.base.ModelConfig`; any image size works."""


class HSNet(FewShotSegmenter):
    """Masked support features -> multi-layer correlation -> 4D encoder -> decoder."""

    Config = HSNetConfig
    name = "hsnet"

    def __init__(self, config: HSNetConfig):
        super().__init__(config)
        self.hpn_learner = HPNLearner(list(reversed(self.backbone.stage_sizes)), backend=config.backend)

    def forward_shot(self, batch: Mapping[str, Any], query_taps: list[torch.Tensor],
                     support_taps: list[torch.Tensor], support_mask: torch.Tensor) -> list[StepOutput]:
        corr = ops.multilayer_correlation(query_taps, support_taps, self.backbone.stack_ids, support_mask,
                                          backend=self.config.backend)
        return [StepOutput(self.hpn_learner(corr))]
