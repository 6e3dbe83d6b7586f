r"""TLG: Through the Looking Glass (arXiv 2508.16159), weakly-supervised few-shot segmentation.

Support and query are two *heterogeneous* views of one backbone: the support reads the last
tap of each stage, the query the first (ResNet50: support 3, 9, 12 / query 0, 4, 10; VGG16:
support 2, 5, 6 / query 0, 3, 6; in general the last / first tap of each of the three stages).

1. Heterogeneous aggregation (HA). Per view, the three taps go through 1x1 convs to 128
   channels (one conv per input width, ``conv_<C>_128``), are resized to the layer2 size and
   fused, :math:`F = \mathrm{final\_cat}([t_{low}, \uparrow t_{mid}, \uparrow t_{high}])`.
   Correlations in both directions, :math:`C_q = \mathrm{corr}(f_q, f_s \odot m_s)` and
   :math:`C_s = \mathrm{corr}(f_s, f_q \odot \tilde m_q)` (:math:`\tilde m_q` the query's CLIP
   pseudo-mask), go through one shared HSNet 4D encoder :math:`E`; the results are cross-merged,
   :math:`F_s \leftarrow \mathrm{merge}([F_s, E(C_q)])`, :math:`F_q \leftarrow \mathrm{merge}([F_q, E(C_s)])`.
2. Heterogeneous transport (HT). ``n_tokens`` tokens are average-pooled from each flattened
   128-channel map; multi-head self-attention; then a cross attention whose weights
   :math:`A = \mathrm{softmax}(QK^\top/\sqrt d)` are replaced by the entropic transport plan
   :math:`P = \mathrm{Sinkhorn}(1 - A, \varepsilon = 0.5)` with uniform marginals
   (``tlg.ops.sinkhorn``, batched on the tensors' device and differentiable); a linear map sends
   the tokens back to the map. Heterogeneous residuals from the mid-level taps (resized to twice
   the map size, 1x1 conv to 128): support max-pooled, query average-pooled,
   :math:`G = \mathrm{ReLU}(\mathrm{BN}(HT(F)) + \mathrm{pool}(\mathrm{res}))`.
3. Heterogeneous CLIP (HC). ``batch["text_embeddings"]`` (B, 3, 512) holds the CLIP embeddings of
   the foreground, part-refined and background co-occurrence prompts of each episode's class;
   ``Linear(512, 625)`` turns each into a 25x25 map. The support map is the part-refined one, the
   query map ``conv_2_1([fg, bg])``; each modulates its view at 25x25.
4. Decoder (HSNet's) on :math:`G + E(C)`, then the pseudo-mask head ``res`` on
   [logits, pseudo-mask] (3 -> 10 -> GELU -> 2). Loss :math:`1.4\,CE_q + 0.6\,CE_s`.

``variant="released"`` reproduces the published code (jarch-ma/TLG, ``model/TLG.py``) where it
differs from the paper, with its module names and shapes so its checkpoints load:

* the correlations use unmasked features;
* the "cross" attention attends to the same image (support to support, query to query), and
  its transport cost is detached (POT on the CPU there; no gradient through the plan);
* self-attention splits one ``kv`` projection (dim -> dim) into keys and values by pairing
  consecutive tokens (even tokens are keys, odd are values), the paper's version uses
  ``kv`` (dim -> 2 dim) as in standard multi-head attention;
* the text branch runs without gradient, so no gradient reaches HA/HT through it;
* the *support* mid-level tap feeds both residuals;
* the loss adds ``1e-4 * sum ||p||_2`` over all parameters; and the unused modules
  ``conv1024_512``, ``voc_conv_bach``, ``coco_conv_batch`` and the 1x1 convs of every width
  (512, 1024, 2048) exist so that the published state dicts load strictly.

Both variants are built for one image size (``img_size``, default 400 as published): the token
map-back ``proj`` is ``Linear(n_tokens, h*w)`` at the layer2 size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tlg import ops

from .base import FewShotSegmenter, ModelConfig, StepOutput, check_batch
from .components import HypercorrelationEncoder, apply_pseudo_mask_head, decode, make_decoder, \
    make_pseudo_mask_head, resize

DIM = 128  # width of the HA / HT features: the 4D encoder's output width
TEXT_DIM = 512  # CLIP text embedding width
TEXT_SIDE = 25  # Linear(512, 625) -> 25 x 25 map
PROMPTS = ("foreground", "part-refined", "background")


@dataclass
class TLGConfig(ModelConfig):
    """TLG options (defaults as published for PASCAL-5i, ResNet50, 400 px).

    Attributes:
        variant: ``"paper"`` (default) or ``"released"`` (the published code's behaviour).
        img_size: the square input size the model is built for.
        n_tokens: tokens pooled from each map for HT (50).
        heads: self-attention heads (8).
        ot_eps, ot_max_iter, ot_tol: Sinkhorn entropy (0.5 as published), iterations, tolerance.
        use_clip: heterogeneous CLIP guidance (needs ``batch["text_embeddings"]``).
        query_weight, support_weight: loss weights (1.4, 0.6).
        l2_penalty: weight of ``sum ||p||_2`` in the loss; None = 0 (paper) / 1e-4 (released).
        dropout: dropout after the attention projections (0.1 as published).
    """

    variant: Literal["paper", "released"] = "paper"
    img_size: int = 400
    n_tokens: int = 50
    heads: int = 8
    ot_eps: float = 0.5
    ot_max_iter: int = 1000
    ot_tol: float = 1e-6
    use_clip: bool = True
    query_weight: float = 1.4
    support_weight: float = 0.6
    l2_penalty: Optional[float] = None
    dropout: float = 0.1


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``q`` (dim -> dim), ``kv``, ``proj`` (dim -> dim), dropout.

    ``paired_kv=False``: ``kv`` is dim -> 2 dim (keys and values of every token).
    ``paired_kv=True`` (published code): ``kv`` is dim -> dim and consecutive token pairs
    (2i, 2i+1) give key i and value i, so N queries attend to N/2 keys.
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1, paired_kv: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads, self.paired_kv, self.scale = heads, paired_kv, (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, dim if paired_kv else 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        kv = self.kv(x).reshape(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)  # (2, B, h, N or N/2, d)
        attn = (q @ kv[0].transpose(-2, -1) * self.scale).softmax(dim=-1)
        y = (attn @ kv[1]).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(y))


class TransportAttention(nn.Module):
    r"""Single-head cross attention whose weights are replaced by an optimal-transport plan.

    .. math::
        A = \mathrm{softmax}(Q K^\top / \sqrt d),\quad
        P = \arg\min_{P \in U(\frac1N, \frac1M)} \langle P, 1 - A\rangle - \varepsilon H(P),\quad
        y = \mathrm{proj}(P V)

    Parameters ``q_fc``, ``k_fc``, ``v_fc``, ``proj`` (no biases), as published.
    ``detach_cost=True`` (published code) stops the gradient at the cost.
    """

    def __init__(self, dim: int, eps: float = 0.5, max_iter: int = 1000, tol: float = 1e-6,
                 dropout: float = 0.1, detach_cost: bool = False, backend: str = "auto"):
        super().__init__()
        self.scale = dim ** -0.5
        self.eps, self.max_iter, self.tol, self.detach_cost, self.backend = eps, max_iter, tol, detach_cost, backend
        self.q_fc = nn.Linear(dim, dim, bias=False)
        self.k_fc = nn.Linear(dim, dim, bias=False)
        self.v_fc = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = (self.q_fc(q) @ self.k_fc(k).transpose(-2, -1) * self.scale).softmax(dim=-1)
        cost = 1 - attn
        if self.detach_cost:
            cost = cost.detach()
        plan = ops.sinkhorn(cost, eps=self.eps, max_iter=self.max_iter, tol=self.tol, backend=self.backend).plan
        return self.proj_drop(self.proj(plan.to(v.dtype) @ self.v_fc(v)))


class TLG(FewShotSegmenter):
    """TLG (see the module docstring); ``forward_shot`` returns query and support logits."""

    Config = TLGConfig
    name = "tlg"
    ignored_keys = ("hpn_learner.decoder",)  # a learner's unused decoder, if a checkpoint has one

    def __init__(self, config: TLGConfig):
        if config.variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {config.variant!r}")
        released = config.variant == "released"
        if released and config.n_tokens % 2:
            raise ValueError(f"variant='released' pairs tokens into keys and values: n_tokens must be even, "
                             f"got {config.n_tokens}")
        super().__init__(config)
        bb = self.backbone
        stages = bb.stage_taps
        self.support_taps = [s[-1] for s in stages]  # ResNet50: 3, 9, 12
        self.query_taps = [s[0] for s in stages]  # ResNet50: 0, 4, 10
        self.map_size = bb.stage_size(config.img_size, 0)  # layer2 size: 50 at 400 px

        self.hpn_learner = HypercorrelationEncoder(list(reversed(bb.stage_sizes)), backend=config.backend)
        self.decoder1, self.decoder2 = make_decoder()
        self.res = make_pseudo_mask_head()
        # HA: one 1x1 conv per input width (published names conv_512_128, conv_1024_128, ...)
        widths = set(bb.stage_channels) | ({512, 1024, 2048} if released else set())
        for c in sorted(widths):
            self.add_module(f"conv_{c}_{DIM}", nn.Conv2d(c, DIM, 1))
        self.final_cat = nn.Conv2d(3 * DIM, DIM, 1)
        self.merge = nn.Sequential(nn.Conv2d(2 * DIM, DIM, 1, bias=False))
        # HT
        self.adapt_pool = nn.AdaptiveAvgPool1d(config.n_tokens)
        self.SelfAttention = SelfAttention(DIM, config.heads, config.dropout, paired_kv=released)
        self.CrossAttention = TransportAttention(DIM, config.ot_eps, config.ot_max_iter, config.ot_tol,
                                                 config.dropout, detach_cost=released, backend=config.backend)
        self.proj = nn.Linear(config.n_tokens, self.map_size ** 2, bias=False)
        self.bn = nn.BatchNorm2d(DIM)
        self.relu = nn.ReLU(inplace=True)
        self.max_pool = nn.MaxPool2d(2, 2)
        self.avg_pool = nn.AvgPool2d(2, 2)
        # HC
        self.linear_512_625 = nn.Linear(TEXT_DIM, TEXT_SIDE ** 2)
        self.conv_2_1 = nn.Conv2d(2, 1, 1)
        if released:  # defined but unused in the published code; kept so its checkpoints load
            if config.backbone.startswith("resnet"):
                self.conv1024_512 = nn.Conv2d(1024, 512, 1)
            self.voc_conv_bach = nn.Conv2d(25, 8, 1)
            self.coco_conv_batch = nn.Conv2d(23, 8, 1)

    @property
    def released(self) -> bool:
        return self.config.variant == "released"

    @property
    def query_weight(self) -> float:
        return self.config.query_weight

    @property
    def support_weight(self) -> float:
        return self.config.support_weight

    def extra_loss(self) -> torch.Tensor | float:
        weight = self.config.l2_penalty if self.config.l2_penalty is not None else (1e-4 if self.released else 0.0)
        if not weight:
            return 0.0
        return weight * sum(p.norm(2) for p in self.parameters())

    def check(self, batch: Mapping[str, Any]) -> tuple[int, int, int, int]:
        b, k, h, w = check_batch(batch)
        size = self.config.img_size
        if (h, w) != (size, size):
            raise ValueError(f"TLG was built for {size}x{size} images (img_size={size}: its token map-back is "
                             f"Linear({self.config.n_tokens}, {self.map_size}*{self.map_size})), got {h}x{w}")
        if batch.get("query_pseudo_mask") is None:
            raise KeyError("TLG needs batch['query_pseudo_mask'] (B, H, W): the query's CLIP pseudo-mask, "
                           "taken by the head (and by the paper variant's support-direction correlation)")
        if self.config.use_clip:
            self._text_embeddings(batch)  # fail before any work
        return b, k, h, w

    # --- the three modules -----------------------------------------------------------------
    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"conv_{x.shape[1]}_{DIM}")(x)

    def aggregate(self, taps: list[torch.Tensor], ids: list[int]) -> torch.Tensor:
        """HA features of one view: 1x1 convs to 128, resize to the layer2 size, fuse."""
        low, mid, high = (self._reduce(taps[i]) for i in ids)
        size = low.shape[-2:]
        return self.final_cat(torch.cat([low, resize(mid, size), resize(high, size)], dim=1))

    def transport(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """HT: tokens of ``x`` self-attend, then attend to the tokens of ``other`` through OT."""
        b, c, h, w = x.shape
        tokens = self.adapt_pool(x.flatten(2)).transpose(1, 2)  # (B, N, C)
        others = self.adapt_pool(other.flatten(2)).transpose(1, 2)
        y = self.CrossAttention(self.SelfAttention(tokens), others, others)
        return self.proj(y.transpose(1, 2)).view(b, c, h, w)

    def residual(self, mid: torch.Tensor, size: tuple[int, int], pool: nn.Module) -> torch.Tensor:
        """Heterogeneous residual: mid-level tap at twice ``size``, 1x1 conv to 128, 2x2 pool.

        The conv runs before the resize (the published code resizes first): the same function, as a
        1x1 conv commutes with a bilinear resize, whose weights sum to one, but the resize then moves
        128 channels instead of 1024 (ResNet50's layer3), and the conv and its backward run at the
        tap's own size.
        """
        return pool(resize(self._reduce(mid), (2 * size[0], 2 * size[1])))

    def _text_embeddings(self, batch: Mapping[str, Any]) -> torch.Tensor:
        emb = batch.get("text_embeddings")
        if emb is None:
            hint = ("" if batch.get("class_names") is not None else
                    " The batch has no 'class_names' either, which those prompts are built from.")
            raise KeyError("TLG with CLIP guidance (use_clip=True) needs batch['text_embeddings'] (B, 3, 512): "
                           "CLIP text embeddings of the foreground, part-refined and background co-occurrence "
                           "prompts of each episode's class (batch['class_names']). Compute them with tlg.clip, "
                           f"or build the model with use_clip=False.{hint}")
        b = batch["query_img"].shape[0]
        if not isinstance(emb, torch.Tensor) or tuple(emb.shape) != (b, len(PROMPTS), TEXT_DIM):
            got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"text_embeddings must be (B, 3, 512) = ({b}, 3, 512) "
                             f"({', '.join(PROMPTS)} prompts), got {got}")
        return emb

    def text_maps(self, batch: Mapping[str, Any], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """HC: (support map, query map), each (B, 1, 25, 25)."""
        emb = self._text_embeddings(batch).to(dtype)
        fg, refined, bg = self.linear_512_625(emb).unflatten(-1, (TEXT_SIDE, TEXT_SIDE)).split(1, dim=1)
        return refined, self.conv_2_1(torch.cat([fg, bg], dim=1))

    @staticmethod
    def modulate(x: torch.Tensor, text_map: torch.Tensor) -> torch.Tensor:
        """Multiply ``x`` by the 25x25 text map at 25x25, then resize back (bilinear)."""
        y = F.interpolate(x, size=text_map.shape[-2:], mode="bilinear") * text_map
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear")

    # --- one shot ---------------------------------------------------------------------------
    def forward_shot(self, batch: Mapping[str, Any], query_taps: list[torch.Tensor],
                     support_taps: list[torch.Tensor], support_mask: torch.Tensor) -> list[StepOutput]:
        released, backend = self.released, self.config.backend
        query_pseudo = batch["query_pseudo_mask"]
        stack_ids = self.backbone.stack_ids

        # HA: heterogeneous taps, correlations both ways through the shared 4D encoder, cross-merge
        s_feat = self.aggregate(support_taps, self.support_taps)
        q_feat = self.aggregate(query_taps, self.query_taps)
        # both directions as one batch (query->support, then support->query): the encoder's input
        # comes out stacked, with no copy of the volumes
        corr = ops.multilayer_correlation([torch.cat([q, s]) for q, s in zip(query_taps, support_taps)],
                                          [torch.cat([s, q]) for q, s in zip(query_taps, support_taps)], stack_ids,
                                          None if released else torch.cat([support_mask, query_pseudo]),
                                          backend=backend)
        enc_q, enc_s = self.hpn_learner(corr).chunk(2)
        s_feat = self.merge(torch.cat([s_feat, enc_q], dim=1))
        q_feat = self.merge(torch.cat([q_feat, enc_s], dim=1))

        # HT: OT attention, heterogeneous residuals (support max-pool, query avg-pool)
        size = tuple(s_feat.shape[-2:])
        s_mid = support_taps[self.support_taps[1]]
        q_mid = s_mid if released else query_taps[self.query_taps[1]]
        s_out = self.transport(s_feat, s_feat if released else q_feat)
        q_out = self.transport(q_feat, q_feat if released else s_feat)
        s_out = self.relu(self.bn(s_out) + self.residual(s_mid, size, self.max_pool))
        q_out = self.relu(self.bn(q_out) + self.residual(q_mid, size, self.avg_pool))

        # HC: text maps modulate each view
        if self.config.use_clip:
            with torch.no_grad() if released else contextlib.nullcontext():
                s_map, q_map = self.text_maps(batch, s_out.dtype)
                s_out, q_out = self.modulate(s_out, s_map), self.modulate(q_out, q_map)

        # decoder and pseudo-mask head
        q_logits = decode(self.decoder1, self.decoder2, q_out + enc_q)
        s_logits = decode(self.decoder1, self.decoder2, s_out + enc_s)
        return [StepOutput(apply_pseudo_mask_head(self.res, q_logits, query_pseudo),
                           apply_pseudo_mask_head(self.res, s_logits, support_mask))]
