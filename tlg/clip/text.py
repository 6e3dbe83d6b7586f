"""CLIP text embeddings, batched and cached on disk.

Cache: one file per model, ``<cache_dir>/text/<model_id>.pt``, a dict ``sha256(prompt) -> (D,) float32``
of L2-normalised embeddings. It is read once per process, extended with new prompts and rewritten
atomically (temp file + ``os.replace``), so a crash never leaves a broken cache. ``cache_dir`` defaults to
``$TLG_CACHE`` or ``~/.cache/tlg``; ``cache_dir=False`` disables the disk cache.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .model import ClipModel, tokenize
from .prompts import background_concepts, background_texts, foreground_texts, without_text

__all__ = ["default_cache_dir", "encode_texts", "class_embeddings", "background_embeddings"]

_MEMORY: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


def default_cache_dir() -> Path:
    """``$TLG_CACHE`` or ``~/.cache/tlg``."""
    return Path(os.environ.get("TLG_CACHE") or Path.home() / ".cache" / "tlg")


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cache_file(cache_dir, model_id: str) -> Path | None:
    if cache_dir is False:
        return None
    root = default_cache_dir() if cache_dir is None else Path(cache_dir)
    return root / "text" / f"{model_id}.pt"


def _load_cache(path: Path | None, model_id: str) -> dict[str, torch.Tensor]:
    key = (str(path), model_id)
    if key not in _MEMORY:
        table: dict[str, torch.Tensor] = {}
        if path is not None and path.is_file():
            try:
                table = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a corrupt cache is rebuilt, never trusted
                table = {}
        _MEMORY[key] = table
    return _MEMORY[key]


def _save_cache(path: Path, table: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@torch.no_grad()
def encode_texts(clip: ClipModel, texts: list[str], *, cache_dir=None, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised CLIP text embeddings (N, D) of ``texts``, computed in batches of ``batch_size``;
    embeddings already in the cache (same ``clip.model_id`` and prompt text) are not recomputed."""
    path = _cache_file(cache_dir, clip.model_id)
    table = _load_cache(path, clip.model_id)
    keys = [_text_key(t) for t in texts]
    todo = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in table))
    if todo:
        device = next(clip.model.parameters()).device
        context = getattr(clip.model, "context_length", 77)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            emb = clip.model.encode_text(tokenize(chunk, context).to(device))
            emb = F.normalize(emb.float(), dim=-1).cpu()
            for text, vec in zip(chunk, emb):
                table[_text_key(text)] = vec.clone()
        if path is not None:
            _save_cache(path, table)
    if not texts:
        return torch.empty(0, clip.model.visual.output_dim)
    return torch.stack([table[k] for k in keys])


def _ensemble(vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(vectors.mean(dim=0), dim=-1)


def class_embeddings(clip: ClipModel, class_names: list[str], *, parts: bool = True, cache_dir=None) -> torch.Tensor:
    """(C, D) one prompt-ensembled embedding per class name: normalised mean over templates x names (+ parts)."""
    return _embed_groups(clip, [foreground_texts(name, parts=parts) for name in class_names], cache_dir)


def background_embeddings(clip: ClipModel, class_name: str | None = None, *, generic: bool = True,
                          without: bool = False, cache_dir=None) -> torch.Tensor:
    """(K, D) background prompt embeddings competing with ``class_name``: one per co-occurring / generic
    background concept (ensembled over the background templates), plus DOTGraph's
    ``"this is an image without <class>."`` when ``without``."""
    concepts = background_concepts(class_name, generic=generic)
    groups = [background_texts(c) for c in concepts]
    if without and class_name is not None:
        groups.append([without_text(class_name)])
    if not groups:
        return torch.empty(0, clip.model.visual.output_dim)
    return _embed_groups(clip, groups, cache_dir)


def _embed_groups(clip: ClipModel, groups: list[list[str]], cache_dir) -> torch.Tensor:
    """(len(groups), D): every prompt encoded in one batch, then ensembled per group."""
    flat = encode_texts(clip, [t for g in groups for t in g], cache_dir=cache_dir)
    out, start = [], 0
    for g in groups:
        out.append(_ensemble(flat[start:start + len(g)]))
        start += len(g)
    return torch.stack(out)
