"""``tlg pseudo-masks``: the command-line front of :func:`tlg.clip.pseudomasks.generate`.

``add_parser(subparsers)`` adds the sub-command to tlg's CLI; ``python -m tlg.clip.cli pseudo-masks ...``
runs it alone. The dataset comes from ``tlg.data.build_source`` (imported when the command runs).
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run", "main"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``pseudo-masks`` to an ``argparse`` sub-parsers object; the parsed args carry ``func=run``."""
    p = subparsers.add_parser(
        "pseudo-masks", help="CLIP Grad-CAM pseudo-masks for a dataset split",
        description="Write CLIP Grad-CAM pseudo-masks for every (image, class) of a split; resumable. "
                    "Layouts: png/tlg = OUT/<class_name>/<image_id>.png (0/255), png/tlg-repo = the public TLG "
                    "code's OUT/<image_id>--<class-1>.png, pt = OUT/<class_name>/<image_id>.pt.",
    )
    p.add_argument("--dataset", required=True, help="pascal | coco | fss | synthetic")
    p.add_argument("--root", default=None, help="dataset folder")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--split", default="trn", help="trn | val | test")
    p.add_argument("--clip-weights", required=True,
                   help="local CLIP file (OpenAI TorchScript .pt or open_clip checkpoint)")
    p.add_argument("--arch", default="auto", choices=["auto", "RN50", "ViT-B/16", "ViT-B/32"],
                   help="CLIP architecture (auto: told from the weight shapes)")
    p.add_argument("--weights-format", default="auto", choices=["auto", "openai", "open_clip"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="png", choices=["png", "pt"])
    p.add_argument("--layout", default="tlg", choices=["tlg", "tlg-repo"])
    p.add_argument("--threshold", type=float, default=0.5, help="mask = normalised CAM >= threshold")
    p.add_argument("--soft", action="store_true", help="png/tlg: write soft CAMs as grey levels")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=None, help="CLIP input side (default: native)")
    p.add_argument("--no-background", action="store_true", help="no background prompts in the softmax")
    p.add_argument("--no-softmax", action="store_true", help="target = raw logit instead of softmax probability")
    p.add_argument("--cam-mode", default="gradcam", choices=["gradcam", "hirescam"])
    p.add_argument("--cache-dir", default=None, help="text-embedding cache (default $TLG_CACHE or ~/.cache/tlg)")
    p.add_argument("--no-resume", action="store_true", help="recompute and overwrite existing files")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``pseudo-masks`` from parsed arguments; returns the exit status."""
    try:
        from tlg.data import build_source
    except ImportError as err:
        print(f"tlg pseudo-masks: the datasets (tlg.data.build_source) are not available: {err}", file=sys.stderr)
        return 2
    from .model import CheckpointError, load_clip
    from .pseudomasks import generate

    try:
        source = build_source(args.dataset, root=args.root, fold=args.fold, split=args.split)
        model = load_clip(args.clip_weights, args.arch, fmt=args.weights_format, device=args.device)
        result = generate(
            source, model, args.out, fmt=args.format, layout=args.layout, threshold=args.threshold, soft=args.soft,
            batch_size=args.batch_size, input_size=args.input_size, background=not args.no_background,
            softmax=not args.no_softmax, cam_mode=args.cam_mode, cache_dir=args.cache_dir,
            resume=not args.no_resume, limit=args.limit,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"tlg pseudo-masks: {err}", file=sys.stderr)
        return 2
    print(f"pseudo-masks: {result.written} written, {result.skipped} already there, in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tlg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
