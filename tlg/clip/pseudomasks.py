"""The pseudo-mask tool: CLIP Grad-CAM masks for every (image, class) record of a dataset split.

Output layouts (``out_dir`` = OUT):

==============  =====================================  ===============================================
format/layout   file                                   content
==============  =====================================  ===============================================
png / tlg       OUT/<class_name>/<image_id>.png        uint8 mask 0/255 (``soft``: grey levels 0..255
                                                       = CAM x 255); what ``tlg.data.masks.
                                                       PseudoMaskFiles`` reads
png / tlg-repo  OUT/<image_id>--<class_id-1>.png       uint8, 0 or ``class_id`` (the public TLG code's
                (PASCAL, FSS, synthetic)               PASCAL layout: ``<name>--<0-based class>.png``,
                                                       pixel = class + 1)
png / tlg-repo  OUT/<image_id>.png (dataset "coco")    uint8 label map per image, 0 or ``class_id``
                                                       (overlaps: the larger CAM wins)
pt              OUT/<class_name>/<image_id>.pt         dict(cam=float16 (H, W) in [0, 1], mask=uint8
                                                       {0,1}, threshold, image_id, class_id, model_id)
==============  =====================================  ===============================================

Every file is written to a temp file beside it and moved into place with ``os.replace``: a file either
exists complete or not at all. ``resume=True`` skips records whose file exists, so an interrupted run
picks up where it stopped. ``OUT/settings.json`` records the model and settings; resuming with other
settings is refused (use a new folder or ``resume=False``).

When the source has ground truth, the quality report (IoU of the thresholded pseudo-masks per class,
summed intersection over summed union, 255 ignored; mIoU = their mean) is printed and written to
``OUT/quality.json`` and ``OUT/quality.csv``.
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .gradcam import compute_cams
from .model import ClipModel

__all__ = ["generate", "GenerateResult", "output_path", "read_pseudo_mask", "LAYOUTS"]

LAYOUTS = ("tlg", "tlg-repo")
FORMATS = ("png", "pt")
_SETTINGS = ("model_id", "format", "layout", "threshold", "soft", "background", "softmax", "input_size", "cam_mode")


@dataclass
class GenerateResult:
    """What :func:`generate` did: files written / skipped, and the quality report (None without ground truth)."""

    written: int = 0
    skipped: int = 0
    report: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)


def _per_image(source, fmt: str, layout: str) -> bool:
    return fmt == "png" and layout == "tlg-repo" and getattr(source, "name", "") == "coco"


def output_path(out_dir: str | os.PathLike, source, image_id: str, class_id: int, *, fmt: str = "png",
                layout: str = "tlg") -> Path:
    """Where the pseudo-mask of (image_id, class_id) goes (see the module docstring)."""
    out = Path(out_dir)
    if fmt == "pt":
        return out / source.class_names[class_id] / f"{image_id}.pt"
    if layout == "tlg":
        return out / source.class_names[class_id] / f"{image_id}.png"
    if _per_image(source, fmt, layout):
        return out / f"{image_id}.png"
    return out / f"{image_id}--{class_id - 1}.png"


def _save_file(path: Path, write) -> None:
    """Atomic write: ``write(tmp_path)`` then ``os.replace(tmp, path)``; no partial file survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_png(path: Path, array: np.ndarray) -> None:
    _save_file(path, lambda tmp: Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG"))


def read_pseudo_mask(path: str | os.PathLike, *, layout: str = "tlg", class_id: int | None = None,
                     threshold: float = 0.5) -> torch.Tensor:
    """Binary mask (H, W) uint8 {0,1} back from an output file (``class_id`` is needed for tlg-repo PNGs)."""
    path = Path(path)
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)["mask"]
    values = torch.from_numpy(np.array(Image.open(path)))
    if layout == "tlg-repo":
        if class_id is None:
            raise ValueError(f"{path}: reading a tlg-repo pseudo-mask needs its class_id")
        return (values == class_id).to(torch.uint8)
    return (values.float() / 255.0 >= threshold).to(torch.uint8)


def _check_settings(out_dir: Path, settings: dict, resume: bool) -> None:
    path = out_dir / "settings.json"
    if resume and path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), settings.get(k)) for k in _SETTINGS if old.get(k) != settings.get(k)}
        if diff:
            raise ValueError(
                f"{out_dir} holds pseudo-masks made with other settings {diff} (old, new); "
                "use another output folder or resume=False to overwrite"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_file(path, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2)))


def _has_ground_truth(source, image_id: str, class_id: int) -> bool:
    try:
        source.load_mask(image_id, class_id)
        return True
    except (NotImplementedError, FileNotFoundError, OSError, ValueError):
        return False


def generate(
    source,
    model: ClipModel,
    out_dir: str | os.PathLike,
    *,
    fmt: str = "png",
    layout: str = "tlg",
    threshold: float = 0.5,
    soft: bool = False,
    batch_size: int = 8,
    input_size: int | None = None,
    background: bool = True,
    softmax: bool = True,
    cam_mode: str = "gradcam",
    cache_dir=None,
    resume: bool = True,
    report: bool = True,
    progress: bool = True,
    limit: int | None = None,
) -> GenerateResult:
    """Write CLIP Grad-CAM pseudo-masks of every record of ``source`` (a ``tlg.data.SegmentationSource``).

    Args:
        model: a loaded CLIP (:func:`tlg.clip.load_clip`).
        out_dir: output folder (layouts in the module docstring).
        fmt: ``"png"`` or ``"pt"``; layout: ``"tlg"`` (ours) or ``"tlg-repo"`` (the public TLG code's).
        threshold: mask = CAM >= threshold (CAMs are max-normalised to [0, 1]).
        soft: png/tlg only: write the soft CAM as grey levels instead of the 0/255 mask.
        batch_size: (image, class) pairs per forward/backward pass.
        input_size: CLIP input side (default: the model's native size); the whole image is resized.
        background, softmax: target = softmax over the class, the image's other labelled classes and the
            class's background prompts (see :mod:`tlg.clip.gradcam`); ``softmax=False``: plain logit.
        cam_mode: ``"gradcam"`` (IMR-HSNet's choice) or ``"hirescam"`` (element-wise).
        resume: skip records whose output exists; ``False`` recomputes and overwrites everything.
        report: compute the quality report when ground truth exists.
        limit: only the first ``limit`` images (smoke runs).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    out_dir = Path(out_dir)
    settings = {"model_id": model.model_id, "arch": model.arch, "format": fmt, "layout": layout,
                "threshold": threshold, "soft": soft, "background": background, "softmax": softmax,
                "input_size": input_size or model.image_size, "cam_mode": cam_mode,
                "dataset": getattr(source, "name", None)}
    _check_settings(out_dir, settings, resume)

    by_image: dict[str, list[int]] = defaultdict(list)
    for rec in source.records:
        if rec.class_id not in by_image[rec.image_id]:
            by_image[rec.image_id].append(rec.class_id)
    image_ids = list(by_image)[: limit if limit is not None else None]
    per_image = _per_image(source, fmt, layout)
    path_of = lambda i, c: output_path(out_dir, source, i, c, fmt=fmt, layout=layout)  # noqa: E731

    with_gt = report and bool(image_ids) and _has_ground_truth(source, image_ids[0], by_image[image_ids[0]][0])
    inter: dict[int, int] = defaultdict(int)
    union: dict[int, int] = defaultdict(int)

    def score(image_id: str, class_id: int, mask: torch.Tensor) -> None:
        truth = source.load_mask(image_id, class_id)
        valid = truth != 255
        pred, gt = mask.bool() & valid, (truth == 1) & valid
        inter[class_id] += int((pred & gt).sum())
        union[class_id] += int((pred | gt).sum())

    result = GenerateResult()
    todo: list[str] = []
    for image_id in image_ids:
        done = [path_of(image_id, c).is_file() for c in by_image[image_id]]
        if resume and all(done):
            result.skipped += len(done)
            if with_gt:
                for c in by_image[image_id]:
                    score(image_id, c, read_pseudo_mask(path_of(image_id, c), layout=layout, class_id=c,
                                                          threshold=threshold))
        else:
            todo.append(image_id)

    total = sum(len(by_image[i]) for i in image_ids)
    bar = _progress(total, result.skipped, progress, getattr(source, "name", "pseudo-masks"))
    chunk: list[str] = []
    try:
        for n, image_id in enumerate(todo):
            chunk.append(image_id)
            pairs = sum(len(by_image[i]) for i in chunk)
            if pairs >= batch_size or n == len(todo) - 1:
                _run_chunk(source, model, chunk, by_image, path_of, per_image, result, score if with_gt else None,
                           fmt=fmt, layout=layout, threshold=threshold, soft=soft, batch_size=batch_size,
                           input_size=input_size, background=background, softmax=softmax, cam_mode=cam_mode,
                           cache_dir=cache_dir, resume=resume)
                bar.update(pairs)
                chunk = []
    finally:
        bar.close()

    if with_gt:
        result.report = _report(source, inter, union, out_dir)
    return result


def _progress(total: int, initial: int, enabled: bool, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, disable=not enabled, desc=f"pseudo-masks {desc}", unit="mask")
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


def _run_chunk(source, model, chunk, by_image, path_of, per_image, result, score, *, fmt, layout, threshold,
               soft, batch_size, input_size, background, softmax, cam_mode, cache_dir, resume) -> None:
    images = {i: source.load_image(i) for i in chunk}
    pairs = [(i, c) for i in chunk for c in by_image[i]]
    names = source.class_names
    cams = compute_cams(
        model, [images[i] for i, _ in pairs], [names[c] for _, c in pairs],
        [[names[o] for o in by_image[i] if o != c] for i, c in pairs],
        background=background, softmax=softmax, input_size=input_size, batch_size=batch_size, cache_dir=cache_dir,
        mode=cam_mode,
    )
    by_pair = dict(zip(pairs, cams))
    for image_id in chunk:
        classes = by_image[image_id]
        masks = {c: (by_pair[(image_id, c)] >= threshold).to(torch.uint8) for c in classes}
        if score is not None:
            for c in classes:
                score(image_id, c, masks[c])
        if per_image:  # one label map per image (the TLG code's COCO layout)
            path = path_of(image_id, classes[0])
            stack = torch.stack([by_pair[(image_id, c)] * masks[c] for c in classes])
            best = stack.argmax(dim=0)
            label = torch.tensor(classes, dtype=torch.uint8)[best] * (stack.max(dim=0).values > 0)
            _write_png(path, label.numpy())
            result.written += len(classes)
            result.files.append(str(path))
            continue
        for c in classes:
            path = path_of(image_id, c)
            if resume and path.is_file():
                result.skipped += 1
                continue
            cam, mask = by_pair[(image_id, c)], masks[c]
            if fmt == "pt":
                payload = {"cam": cam.half(), "mask": mask, "threshold": threshold, "image_id": image_id,
                           "class_id": c, "model_id": model.model_id}
                _save_file(path, lambda tmp, p=payload: torch.save(p, tmp))
            elif layout == "tlg":
                _write_png(path, (cam * 255).round().numpy() if soft else mask.numpy() * 255)
            else:
                _write_png(path, mask.numpy() * c)
            result.written += 1
            result.files.append(str(path))


def _report(source, inter, union, out_dir: Path) -> dict[str, Any]:
    rows = []
    for c in sorted(union):
        iou = inter[c] / union[c] if union[c] else float("nan")
        rows.append({"class_id": c, "class_name": source.class_names[c], "iou": iou,
                     "intersection": inter[c], "union": union[c]})
    valid = [r["iou"] for r in rows if r["iou"] == r["iou"]]
    miou = float(np.mean(valid)) if valid else float("nan")
    report = {"dataset": getattr(source, "name", None), "miou": miou, "classes": rows}
    _save_file(out_dir / "quality.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))

    def write_csv(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["class_id", "class_name", "iou", "intersection", "union"])
            w.writeheader()
            w.writerows(rows)
            w.writerow({"class_id": "", "class_name": "mIoU", "iou": miou, "intersection": "", "union": ""})

    _save_file(out_dir / "quality.csv", write_csv)
    print(f"pseudo-mask quality ({report['dataset']}): mIoU {100 * miou:.1f}")
    for r in rows:
        print(f"  {r['class_id']:4d} {r['class_name']:<24s} IoU {100 * r['iou']:.1f}")
    return report
