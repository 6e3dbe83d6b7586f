"""Load CLIP (RN50, ViT-B/16, ViT-B/32) from a local file, never from the network.

Accepted files (``fmt="auto"`` tells them apart):

* ``"openai"``: OpenAI's release format, a TorchScript archive (``RN50.pt``, ``ViT-B-16.pt``, ...), or the
  state dict of such a model saved with ``torch.save`` (keys ``visual.*``, ``transformer.*``,
  ``token_embedding.weight``, ...; often float16; may carry ``input_resolution``/``context_length``/
  ``vocab_size`` entries). OpenAI models use QuickGELU.
* ``"open_clip"``: an open_clip checkpoint: a state dict, or a training checkpoint ``{"state_dict": ...}``
  (keys may carry a ``module.`` prefix), ``.pt``/``.pth``/``.bin`` or ``.safetensors``. GELU unless told.

Detection: a TorchScript zip -> openai; a dict with ``"state_dict"`` -> open_clip; a bare state dict with
the OpenAI extra entries or float16 weights -> openai; else open_clip. Pass ``fmt``/``quick_gelu`` to override.

The model is built from open_clip's config for ``arch`` (``pretrained=None``: random init, then the file's
weights), so shapes are checked against what ``arch`` expects; a mismatch raises :class:`CheckpointError`
naming the file, the expected architecture and what the file seems to hold.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .compat import import_open_clip

__all__ = ["ARCHS", "ClipModel", "CheckpointError", "load_clip", "infer_arch", "build_clip", "wrap_model",
           "tokenizer", "tokenize"]

# our names -> open_clip config names
ARCHS = {"RN50": "RN50", "ViT-B/16": "ViT-B-16", "ViT-B/32": "ViT-B-32"}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(ValueError):
    """A CLIP weight file is missing, unreadable, or does not fit the requested architecture."""


@dataclass
class ClipModel:
    """A loaded CLIP model and what the rest of tlg needs to know about it.

    Attributes:
        model: the open_clip ``CLIP`` module, float32, eval mode, gradients off.
        arch: architecture name (``"RN50"``, ``"ViT-B/16"``, ``"ViT-B/32"`` or a custom label).
        model_id: identity used to key caches: arch + SHA-256 of the weight file (or of the weights).
        image_size: native input size (224 for the released models).
        mean, std: image normalisation (OpenAI's constants, as all open_clip CLIP checkpoints use).
    """

    model: Any
    arch: str
    model_id: str
    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    source: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_vit(self) -> bool:
        return not hasattr(self.model.visual, "attnpool")


def _config(arch: str | dict) -> tuple[str, dict]:
    open_clip = import_open_clip()
    if isinstance(arch, dict):
        return arch.get("name", "custom"), {k: v for k, v in arch.items() if k != "name"}
    if arch not in ARCHS:
        raise ValueError(f"unknown CLIP architecture {arch!r}; expected one of {sorted(ARCHS)} or a config dict")
    return arch, open_clip.get_model_config(ARCHS[arch])


def build_clip(arch: str | dict, quick_gelu: bool = False, device: str | torch.device | None = None) -> Any:
    """A randomly initialised open_clip ``CLIP`` for ``arch`` (a name of :data:`ARCHS` or an open_clip
    model config dict ``{"embed_dim", "vision_cfg", "text_cfg"}``). Nothing is downloaded.
    ``device="meta"`` builds the skeleton without initialising (or allocating) weights."""
    open_clip = import_open_clip()
    _, cfg = _config(arch)
    cfg = dict(cfg)
    cfg.pop("custom_text", None)
    if device is None:
        return open_clip.model.CLIP(**cfg, quick_gelu=quick_gelu).eval()
    with torch.device(device):
        return open_clip.model.CLIP(**cfg, quick_gelu=quick_gelu).eval()


def _causal_mask(n: int) -> torch.Tensor:
    """The text tower's additive causal mask: -inf above the diagonal."""
    return torch.full((n, n), float("-inf")).triu_(1)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, detected format) of a weight file."""
    if _is_torchscript(path):
        try:
            archive = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{path}: looks like a TorchScript archive but cannot be loaded: {err}") from err
        return dict(archive.state_dict()), "openai"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"{path}: not a readable CLIP checkpoint (expected an OpenAI TorchScript archive, a state dict, or an "
            f"open_clip checkpoint saved with torch.save): {type(err).__name__}: {err}"
        ) from err
    fmt = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, fmt = obj["state_dict"], "open_clip"
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    if fmt is None:
        half = any(v.dtype == torch.float16 for v in obj.values())
        fmt = "openai" if half or any(k in obj for k in _OPENAI_EXTRA_KEYS) else "open_clip"
    return obj, fmt


def _describe(sd: dict[str, torch.Tensor]) -> str:
    """What a CLIP state dict holds, in words (for error messages)."""
    try:
        if "visual.proj" in sd and "visual.conv1.weight" in sd:
            w = sd["visual.conv1.weight"]
            layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            return f"a ViT (width {w.shape[0]}, {layers} layers, patch {w.shape[-1]}, image {grid * w.shape[-1]})"
        if "visual.attnpool.positional_embedding" in sd:
            counts = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            return f"a ModifiedResNet (blocks {counts}, width {width})"
    except (KeyError, IndexError):
        pass
    keys = ", ".join(list(sd)[:4])
    return f"no CLIP image tower recognised (first keys: {keys})"


def infer_arch(sd: dict[str, torch.Tensor], path: str | os.PathLike = "<state dict>") -> str:
    """Which of :data:`ARCHS` a CLIP state dict is: ViT patch size 16 / 32 with width 768, or the
    ModifiedResNet with blocks (3, 4, 6, 3) and width 64 (RN50)."""
    try:
        if "visual.proj" in sd and "visual.conv1.weight" in sd:
            width, _, patch, _ = sd["visual.conv1.weight"].shape
            if width == 768 and patch in (16, 32):
                return f"ViT-B/{patch}"
        elif "visual.attnpool.positional_embedding" in sd:
            counts = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
            if counts == [3, 4, 6, 3] and sd["visual.layer1.0.conv1.weight"].shape[0] == 64:
                return "RN50"
    except (KeyError, ValueError):
        pass
    raise CheckpointError(f"{path}: cannot tell the architecture: the file holds {_describe(sd)}; "
                          f"expected one of {sorted(ARCHS)} (pass arch= explicitly for other models)")


def load_clip(
    path: str | os.PathLike,
    arch: str | dict,
    *,
    fmt: str = "auto",
    quick_gelu: bool | None = None,
    device: str | torch.device = "cpu",
) -> ClipModel:
    """Load CLIP weights from a local file into an ``arch`` model (see the module docstring).

    Args:
        path: the weight file.
        arch: ``"RN50"``, ``"ViT-B/16"``, ``"ViT-B/32"``, ``"auto"`` (told from the weights' shapes, see
            :func:`infer_arch`) or an open_clip model config dict (tests, custom).
        fmt: ``"auto"``, ``"openai"`` or ``"open_clip"``.
        quick_gelu: activation of the towers; ``None`` = True for OpenAI files, False for open_clip ones.
    Raises:
        CheckpointError: file missing, unreadable, or not fitting ``arch``.
    """
    path = Path(path)
    arch_name = "CLIP" if arch == "auto" else _config(arch)[0]
    if not path.is_file():
        raise CheckpointError(
            f"CLIP weights not found: {path} (expected a local {arch_name} checkpoint: OpenAI's TorchScript archive "
            f"or an open_clip state dict; tlg never downloads weights)"
        )
    if fmt not in ("auto", "openai", "open_clip"):
        raise ValueError(f"fmt must be 'auto', 'openai' or 'open_clip', got {fmt!r}")
    sd, detected = _read_state_dict(path)
    if arch == "auto":
        arch = arch_name = infer_arch(sd, path)
    fmt = detected if fmt == "auto" else fmt
    for key in _OPENAI_EXTRA_KEYS:
        sd.pop(key, None)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    if quick_gelu is None:
        quick_gelu = fmt == "openai"
    model = build_clip(arch, quick_gelu=quick_gelu, device="meta")  # no random init: the file has the weights
    expected = model.state_dict()
    for name, _ in model.named_buffers():  # non-persistent buffers (e.g. attn_mask) some archives carry
        if name not in expected:
            sd.pop(name, None)
    if "logit_scale" in sd and sd["logit_scale"].shape != expected["logit_scale"].shape:
        sd["logit_scale"] = sd["logit_scale"].reshape(expected["logit_scale"].shape)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            details.append(f"{len(wrong)} shape mismatches (file vs expected), e.g. {wrong[:2]}")
        if missing:
            details.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"{path} does not fit CLIP {arch_name} ({fmt} format): the file holds {_describe(sd)}; "
            + "; ".join(details)
        )
    model.load_state_dict(sd, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):  # non-persistent buffers are not in the file
        if buf.is_meta:
            if name != "attn_mask":
                raise RuntimeError(f"tlg.clip: unexpected non-persistent buffer {name!r} in open_clip's CLIP")
            model.attn_mask = _causal_mask(buf.shape[0])
    model = model.to(device).float().eval().requires_grad_(False)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    return ClipModel(
        model=model,
        arch=arch_name,
        model_id=f"{arch_name.replace('/', '-')}-{_file_sha256(path)[:20]}",
        image_size=image_size,
        source=str(path),
        extra={"format": fmt, "quick_gelu": quick_gelu},
    )


def wrap_model(model: Any, arch: str = "custom", model_id: str | None = None) -> ClipModel:
    """Wrap an in-memory open_clip ``CLIP`` (e.g. random init in tests); ``model_id`` defaults to a hash of
    the weights."""
    if model_id is None:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        model_id = f"{arch.replace('/', '-')}-{digest.hexdigest()[:20]}"
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    model = model.float().eval().requires_grad_(False)
    return ClipModel(model=model, arch=arch, model_id=model_id, image_size=image_size)


_TOKENIZER = None


def tokenizer():
    """open_clip's ``SimpleTokenizer`` (CLIP's BPE, vocab file shipped inside the package: works offline)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        open_clip = import_open_clip()
        _TOKENIZER = open_clip.tokenizer.SimpleTokenizer()
    return _TOKENIZER


def tokenize(texts: str | list[str], context_length: int = 77) -> torch.Tensor:
    """Token ids (N, context_length): ``<start> bpe... <end>`` zero-padded; lower-cased, whitespace-cleaned."""
    return tokenizer()(texts, context_length=context_length)

