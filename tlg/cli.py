"""The ``tlg`` command line: train | eval | predict | demo | bench | pseudo-masks.

Every command works on the built-in synthetic dataset with no download; ``--dataset pascal``
(``coco``, ``fss``) with ``--root`` switches to a real one.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import torch

DEFAULT_MODEL = "hsnet"
DEMO_BACKBONE = "resnet_tiny"


# --- shared arguments ---------------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser, size: Optional[int] = 400) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=["synthetic", "pascal", "coco", "fss"])
    g.add_argument("--root", help="dataset folder (not needed for synthetic)")
    g.add_argument("--splits-dir", help="HSNet split lists (data/splits) for pascal / fss")
    g.add_argument("--shot", type=int, default=1)
    g.add_argument("--img-size", type=int, default=size,
                   help=f"images are resized to this square side (default: {size or 'the checkpoint’s, else 400'})")
    g.add_argument("--support-masks", default="gt",
                   help="gt | synthetic-cam | clip | DIR of pseudo-mask PNGs (<DIR>/<class>/<image_id>.png)")
    g.add_argument("--query-pseudo-masks", metavar="SPEC",
                   help="query pseudo-masks for TLG's head (same choices as --support-masks; default for tlg: "
                        "the support masks' source when that is not gt)")
    g.add_argument("--text-embeddings", metavar="PT",
                   help="torch file {class name: (P, D) tensor} of prompt embeddings (TLG's CLIP guidance)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--skip-bad-files", action="store_true", help="skip (and count) missing/corrupt files")


def _add_model_args(p: argparse.ArgumentParser, backbone: str = "resnet50") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="tlg | hsnet | imr_hsnet")
    g.add_argument("--backbone", default=backbone)
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="model config option (repeatable), e.g. --option backbone_weights=resnet50.pth")
    g.add_argument("--device", default="auto")


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option expects KEY=VALUE, got {item!r}")
        options[key] = _literal(value)
    return options


def _literal(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _source(args: argparse.Namespace, fold: int, split: str, **kw):
    from tlg.data import build_source

    if args.dataset in ("pascal", "fss") and args.splits_dir:
        kw["splits_dir"] = args.splits_dir
    if args.dataset == "synthetic":
        kw.setdefault("seed", args.seed)
    return build_source(args.dataset, root=args.root, fold=fold, split=split, **kw)


def _episodes(args: argparse.Namespace, source, episodes: Optional[int], *, seed: int, pseudo_query: bool = False,
              keep_original: bool = False):
    from tlg.data import EpisodeDataset, build_support_masks

    query_spec = args.query_pseudo_masks
    if query_spec is None and (pseudo_query or getattr(args, "model", None) == "tlg"):
        query_spec = args.support_masks if args.support_masks != "gt" else None
        if query_spec is None:
            raise SystemExit("query pseudo-masks are needed here: pass --query-pseudo-masks (e.g. synthetic-cam, "
                             "clip, or a directory of PNGs)")
    embeddings = None
    if args.text_embeddings:
        from tlg.engine import load_checkpoint

        embeddings = load_checkpoint(args.text_embeddings)
    return EpisodeDataset(source, shot=args.shot, size=args.img_size, episodes=episodes, seed=seed,
                          support_masks=build_support_masks(args.support_masks, seed=args.seed),
                          query_pseudo_masks=build_support_masks(query_spec, seed=args.seed) if query_spec else None,
                          keep_original=keep_original, text_embeddings=embeddings,
                          on_error="skip" if args.skip_bad_files else "raise")


def _model_spec(args: argparse.Namespace) -> dict[str, Any]:
    """How to rebuild the model, plus the image size it was trained at (eval/predict default to it)."""
    config = _parse_options(args.option)
    if args.model == "tlg":  # TLG is built for one input size
        config.setdefault("img_size", args.img_size)
    return {"name": args.model, "backbone": args.backbone, "config": config, "img_size": args.img_size}


def build_model_from_spec(spec: dict[str, Any]) -> torch.nn.Module:
    """The model a checkpoint's ``model_spec`` describes (``{"name", "backbone", "config"}``)."""
    import tlg

    return tlg.build_model(spec["name"], backbone=spec["backbone"], **spec.get("config", {}))


def load_model(checkpoint: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a ``tlg train`` checkpoint (``last.pt`` or ``best.pt``)."""
    from tlg.engine import load_checkpoint

    state = load_checkpoint(checkpoint, map_location=device)
    if not state.get("model_spec"):
        raise ValueError(f"{checkpoint}: no model_spec; it was not written by tlg train")
    model = build_model_from_spec(state["model_spec"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def _device(name: str) -> torch.device:
    from tlg.engine.trainer import resolve_device

    return resolve_device(name)


# --- train ----------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from tlg.engine import TrainConfig, Trainer

    torch.manual_seed(args.seed)
    train_source = _source(args, args.fold, "trn")
    val_source = _source(args, args.fold, "val")
    train_set = _episodes(args, train_source, args.train_episodes, seed=args.seed)
    val_set = _episodes(args, val_source, args.val_episodes, seed=args.seed) if args.val_episodes else None
    spec = _model_spec(args)
    model = build_model_from_spec(spec)
    config = TrainConfig(out_dir=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, grad_clip=args.grad_clip or None, precision=args.precision,
                         num_workers=args.num_workers, seed=args.seed, device=args.device,
                         schedule=args.schedule, progress=not args.quiet)
    trainer = Trainer(model, train_set, val_set, config, model_spec=spec)
    if trainer.dist.is_main:
        print(f"training {args.model}/{args.backbone} on {args.dataset} fold {args.fold} "
              f"({len(train_set)} episodes/epoch, {trainer.dist.world_size} process(es)) -> {args.out}")
    history = trainer.fit(resume=args.resume)
    if trainer.dist.is_main and history:
        last = history[-1]
        extra = f", val mIoU {last['val_miou']:.2f}" if "val_miou" in last else ""
        print(f"done: epoch {last['epoch']}, train loss {last['train_loss']:.4f}{extra}")
    if trainer.dist.enabled:
        torch.distributed.destroy_process_group()
    return 0


# --- eval -----------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from tlg.data import collate_episodes
    from tlg.engine import evaluate, pseudo_mask_predictor, save_episode_panel

    device = _device(args.device)
    if not (args.checkpoint or args.baseline):
        raise SystemExit("tlg eval needs --checkpoint (or --baseline pseudo-mask)")
    rows = []
    folds = args.folds if args.folds is not None else ([0] if args.dataset == "fss" else [0, 1, 2, 3])
    for fold in folds:
        size, model_name = args.img_size, None
        if args.baseline == "pseudo-mask":
            predictor: Any = pseudo_mask_predictor()
        else:
            predictor, state = load_model(args.checkpoint.format(fold=fold), device)
            size, model_name = size or state["model_spec"].get("img_size"), state["model_spec"]["name"]
        run_args = argparse.Namespace(**{**vars(args), "img_size": size or 400, "model": model_name})
        source = _source(args, fold, "test" if args.dataset == "fss" else "val")
        dataset = _episodes(run_args, source, protocol_episodes(args.dataset, source, args.episodes), seed=args.seed,
                            pseudo_query=args.baseline == "pseudo-mask", keep_original=args.original_size)
        meter = evaluate(predictor, dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                         device=device, original_size=args.original_size, desc=f"fold {fold}")
        rows.append((fold, meter.miou(), meter.fb_iou(), meter.episodes))
        if args.panel and isinstance(predictor, torch.nn.Module):
            batch = collate_episodes([dataset[0]])
            with torch.no_grad():
                save_episode_panel(args.panel.format(fold=fold), batch, predictor.predict(batch))
        if dataset.skipped:
            print(f"fold {fold}: skipped {sum(dataset.skipped.values())} bad file(s): {sorted(dataset.skipped)[:5]}")
    print(format_table(rows, f"{args.dataset} {args.shot}-shot, {rows[0][3]} episodes per fold"))
    return 0


def protocol_episodes(dataset: str, source, requested: Optional[int] = None) -> int:
    """Test episodes per fold: ``requested``, else HSNet's protocol (1000 for PASCAL-5i, COCO-20i and
    the synthetic set; one per test image for FSS-1000)."""
    from tlg.data import TEST_EPISODES

    if requested is not None:
        return requested
    return len(source.records) if dataset == "fss" else TEST_EPISODES


def format_table(rows: Sequence[tuple[int, float, float, int]], title: str) -> str:
    """The per-fold table: fold, mIoU, FB-IoU, episodes, and the mean row."""
    lines = [title, f"{'fold':>6} {'mIoU':>8} {'FB-IoU':>8} {'episodes':>9}"]
    lines += [f"{fold:>6} {miou:8.2f} {fb:8.2f} {n:>9}" for fold, miou, fb, n in rows]
    if len(rows) > 1:
        lines.append(f"{'mean':>6} {sum(r[1] for r in rows) / len(rows):8.2f} "
                     f"{sum(r[2] for r in rows) / len(rows):8.2f} {sum(r[3] for r in rows):>9}")
    return "\n".join(lines)


# --- predict --------------------------------------------------------------------------------------
def cmd_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from tlg.data import normalize_image, resize_mask
    from tlg.data.io import read_grey, read_rgb
    from tlg.engine import overlay

    device = _device(args.device)
    model, state = load_model(args.checkpoint, device)
    size = args.img_size or state["model_spec"].get("img_size") or 400
    if args.support_mask and len(args.support_mask) != len(args.support):
        raise SystemExit(f"{len(args.support)} --support images but {len(args.support_mask)} --support-mask files")
    supports = [read_rgb(p) for p in args.support]
    if args.support_mask:
        masks = [torch.from_numpy(read_grey(p)).float() for p in args.support_mask]
        masks = [m / 255 if m.max() > 1 else m for m in masks]
    else:  # weakly supervised: the class name alone, through CLIP Grad-CAM
        from tlg.clip.gradcam import pseudo_mask

        masks = [pseudo_mask(img, args.class_name, clip_weights=args.clip_weights) for img in supports]
    for image, mask, path in zip(supports, masks, args.support_mask or args.support):
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise SystemExit(f"{path}: mask {tuple(mask.shape)} does not match its image {tuple(image.shape[-2:])}")
    query = read_rgb(args.query)
    batch = {
        "query_img": normalize_image(query, size)[None].to(device),
        "support_imgs": torch.stack([normalize_image(s, size) for s in supports])[None].to(device),
        "support_masks": torch.stack([resize_mask(m, size, soft=True) for m in masks])[None].to(device),
        "class_id": torch.tensor([1], device=device),
        "class_names": [args.class_name],
    }
    if state["model_spec"]["name"] == "tlg":  # TLG's head also takes the query's CLIP pseudo-mask
        from tlg.clip.gradcam import pseudo_mask

        query_cam = pseudo_mask(query, args.class_name, clip_weights=args.clip_weights)
        batch["query_pseudo_mask"] = resize_mask(torch.as_tensor(query_cam).float(), size, soft=True)[None].to(device)
    with torch.no_grad():
        logits = model(batch)
    logits = torch.nn.functional.interpolate(logits.float(), size=tuple(query.shape[-2:]), mode="bilinear",
                                             align_corners=False)
    mask = logits.argmax(1)[0].to(torch.uint8).cpu()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.query))[0]
    mask_path = os.path.join(args.out, f"{stem}_mask.png")
    overlay_path = os.path.join(args.out, f"{stem}_overlay.png")
    Image.fromarray((mask.numpy() * 255)).save(mask_path)
    overlay(query, mask, (255, 60, 40)).save(overlay_path)
    print(f"{args.class_name}: {int(mask.sum())} foreground pixels -> {mask_path}, {overlay_path}")
    return 0


# --- demo -----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """Train a tiny model on the synthetic set, then score it 1-shot on the held-out fold beside
    the untrained model and two pseudo-mask-as-answer baselines (the support's, the query's own);
    write a PNG panel."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(threads)


def _demo(args: argparse.Namespace) -> int:
    import tlg
    from tlg.data import EpisodeDataset, SyntheticCAM, build_source, collate_episodes
    from tlg.engine import TrainConfig, Trainer, evaluate_many, stack_panels
    from tlg.engine.evaluate import pseudo_mask_predictor, support_mask_predictor
    from tlg.engine.visualize import episode_panel

    started = time.time()
    torch.manual_seed(args.seed)
    cam = SyntheticCAM(seed=args.seed)
    train_source = build_source("synthetic", fold=args.fold, split="trn", seed=args.seed, num_images=args.train_images)
    test_source = build_source("synthetic", fold=args.fold, split="val", seed=args.seed, num_images=args.test_images)
    steps_per_epoch = max(1, args.steps // args.epochs)
    train_set = EpisodeDataset(train_source, shot=1, size=args.img_size, episodes=steps_per_epoch * args.batch_size,
                               seed=args.seed, support_masks=cam,
                               query_pseudo_masks=cam if args.model == "tlg" else None)  # TLG's head takes it
    test_set = EpisodeDataset(test_source, shot=1, size=args.img_size, episodes=args.episodes, seed=args.seed + 1,
                              support_masks=cam, query_pseudo_masks=cam)
    if args.model not in tlg.list_models():
        raise SystemExit(f"model {args.model!r} is not available; have {tlg.list_models()}")
    spec = _model_spec(args)
    model = build_model_from_spec(spec)
    untrained = copy.deepcopy(model)
    print(f"tlg demo: {args.model}/{args.backbone} ({model.parameter_counts()['learnable']:,} learnable parameters); "
          f"synthetic fold {args.fold} held out ({len(test_source.classes)} novel classes); {args.img_size}px; "
          f"support masks = synthetic CAM pseudo-masks; {args.threads} thread(s)")
    config = TrainConfig(out_dir=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=0.01, schedule="cosine", warmup_steps=min(20, args.steps // 10),
                         precision=args.precision, seed=args.seed, device="cpu", tensorboard=True,
                         time_limit=args.train_minutes * 60 if args.train_minutes else None)
    trainer = Trainer(model, train_set, None, config, model_spec=spec)
    train_started = time.time()
    history = trainer.fit()
    train_seconds = time.time() - train_started

    meters = evaluate_many({"trained": model, "untrained": untrained, "support-mask": support_mask_predictor(),
                            "pseudo-mask": pseudo_mask_predictor()},
                           test_set, batch_size=args.eval_batch_size, desc=f"test ({len(test_set)} episodes)")
    panels = []
    model.eval()
    for index in range(min(args.panel_rows, len(test_set))):
        batch = collate_episodes([test_set[index]])
        panels.append(episode_panel(batch, model.predict(batch), title=f"{batch['class_names'][0]} (novel class)"))
    panel_path = os.path.join(args.out, "demo_panel.png")
    if panels:
        stack_panels(panels).save(panel_path)

    stopped = " (time limit)" if trainer.stopped_early else ""
    print(f"\nheld-out fold {args.fold}, 1-shot, {len(test_set)} episodes (HSNet protocol), {args.img_size}px")
    print(f"{'':36} {'mIoU':>7} {'FB-IoU':>7}")
    for label, key in (("trained model", "trained"), ("untrained model", "untrained"),
                       ("support pseudo-mask pasted as answer", "support-mask"),
                       ("query's own pseudo-mask as answer", "pseudo-mask")):
        print(f"{label:36} {meters[key].miou():7.2f} {meters[key].fb_iou():7.2f}")
    print(f"\ntrained {trainer.step} steps x {args.batch_size} episodes in {train_seconds:.0f} s{stopped} "
          f"(final loss {history[-1]['train_loss']:.3f}); total {time.time() - started:.0f} s")
    print(f"panel: {panel_path}; checkpoint: {trainer.last_path}; logs: {os.path.join(args.out, 'metrics.csv')}")
    return 0


# --- bench ----------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """pytest-benchmark's quick subset when run from a source checkout, else a short built-in
    comparison of each kernel's "auto" backend against the PyTorch reference."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    benchmarks = os.path.join(checkout, "benchmarks")
    if os.path.isdir(benchmarks) and not args.builtin and importlib.util.find_spec("pytest_benchmark"):
        command = [sys.executable, "-m", "pytest", benchmarks, "--benchmark-only", "-q", "-k", args.k]
        print(" ".join(command))
        return subprocess.call(command, cwd=checkout)
    return builtin_bench(repeat=args.repeat)


def builtin_bench(repeat: int = 5) -> int:
    from tlg import ops

    torch.manual_seed(0)
    q, s = torch.randn(2, 64, 25, 25), torch.randn(2, 64, 25, 25)
    x = torch.randn(1, 4, 13, 13, 13, 13)
    w = torch.randn(8, 4, 3, 3) * 0.1
    b = torch.zeros(8)
    cost = torch.rand(4, 128, 128)
    cases = {
        "correlation 2x64x25x25": lambda backend: ops.correlation(q, s, backend=backend),
        "cp_conv4d 1x4x13^4 -> 8": lambda backend: ops.cp_conv4d(x, w, b, w, b, 2, backend=backend),
        "sinkhorn 4x128x128": lambda backend: ops.sinkhorn(cost, eps=0.1, max_iter=200, backend=backend).plan,
    }
    print(f"{'kernel':28} {'reference ms':>13} {'auto ms':>9} {'speed-up':>9}")
    for name, run in cases.items():
        times = {}
        for backend in ("reference", "auto"):
            run(backend)
            t = time.perf_counter()
            for _ in range(repeat):
                run(backend)
            times[backend] = (time.perf_counter() - t) / repeat * 1000
        print(f"{name:28} {times['reference']:13.2f} {times['auto']:9.2f} {times['reference'] / times['auto']:8.2f}x")
    print(f"auto picks: {ops.backend_info()['auto']['cpu']}")
    return 0


# --- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlg", description="Weakly-supervised few-shot segmentation engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="episodic training with per-epoch checkpoints (torchrun for multi-GPU)")
    _add_data_args(p)
    _add_model_args(p)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--train-episodes", type=int, help="episodes per epoch (default: one per record)")
    p.add_argument("--val-episodes", type=int, default=1000, help="0 to skip validation")
    p.add_argument("--out", default="runs/tlg")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="the standard protocol: 1000 episodes per fold, mIoU and FB-IoU table")
    _add_data_args(p, size=None)
    p.add_argument("--checkpoint", help="checkpoint path; '{fold}' is replaced by the fold")
    p.add_argument("--folds", type=int, nargs="+", help="default: 0 1 2 3 (FSS-1000: its single test split)")
    p.add_argument("--episodes", type=int, help="default: 1000 (FSS-1000: one per test image), as in HSNet")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--original-size", action="store_true", help="score at each query's original size")
    p.add_argument("--baseline", choices=["pseudo-mask"], help="score the query's pseudo-mask instead of a model")
    p.add_argument("--panel", help="write a PNG panel of the first episode ('{fold}' allowed)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment CLASS in a query image from support images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--support", nargs="+", required=True, metavar="IMG")
    p.add_argument("--support-mask", nargs="+", metavar="PNG", help="support masks (default: CLIP Grad-CAM)")
    p.add_argument("--class", dest="class_name", required=True, metavar="NAME")
    p.add_argument("--query", required=True, metavar="IMG")
    p.add_argument("--img-size", type=int, help="default: the size the checkpoint was trained at")
    p.add_argument("--clip-weights", help="local CLIP weights for Grad-CAM support masks")
    p.add_argument("--out", default="predictions")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="train a tiny model on the synthetic set and compare with baselines (CPU)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--backbone", default=DEMO_BACKBONE)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200, help="training steps (at most; see --train-minutes)")
    p.add_argument("--train-minutes", type=float, default=6.0, help="stop training after this long (0: no limit)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest at this tiny size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--episodes", type=int, default=1000, help="test episodes (HSNet protocol: 1000)")
    p.add_argument("--eval-batch-size", type=int, default=25)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--panel-rows", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="kernel benchmarks (quick subset) or a built-in reference-vs-auto timing")
    p.add_argument("-k", default="quick", help="pytest -k expression for benchmarks/")
    p.add_argument("--builtin", action="store_true", help="the built-in comparison even in a source checkout")
    p.add_argument("--repeat", type=int, default=5)
    p.set_defaults(func=cmd_bench)

    try:  # the CLIP engineer's sub-command
        from tlg.clip.cli import add_parser as add_pseudo_mask_parser
    except ImportError:
        pass
    else:
        add_pseudo_mask_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
