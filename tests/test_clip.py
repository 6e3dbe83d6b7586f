"""tlg.clip: torchvision compat, offline loading and tokenizer, prompts and text cache, Grad-CAM, the tool.

Everything runs on CPU with random-init models (no weights are downloaded): a full-size RN50 built once
per module, tiny ViT / ResNet CLIPs from custom open_clip configs, and a hand-built CLIP-like model.
"""
from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tlg.clip import compat
from tlg.clip.model import CheckpointError, build_clip, load_clip, tokenize, wrap_model

TINY_VIT = {"name": "tiny-vit", "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_RN = {"name": "tiny-rn", "embed_dim": 32,
           "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _same_weights(a, b, half=False):
    """``b`` holds ``a``'s weights: same keys; values equal (after a float16 round trip if ``half``),
    checked on every 5th tensor (speed)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in list(sa)[::5] + ["token_embedding.weight", "visual.attnpool.c_proj.weight"]:
        want = sa[k].half().float() if half and sa[k].is_floating_point() and "bn" not in k else sa[k]
        assert sb[k].dtype == sa[k].dtype and torch.equal(sb[k], want), k


def _trace_archive(model, path, image_size):
    """An OpenAI-style TorchScript archive of ``model`` (traced, with OpenAI's extra attributes)."""
    model = model.eval()
    for name, value in (("input_resolution", image_size), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, name):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(
            model, {"encode_image": (torch.ones(1, 3, image_size, image_size),),
                    "encode_text": (torch.zeros(1, 77, dtype=torch.long),)}, check_trace=False)
    traced.save(str(path))


# ---------------------------------------------------------------- compat, tokenizer

def test_compat_makes_open_clip_importable_and_is_idempotent():
    oc = compat.import_open_clip()
    assert compat.import_open_clip() is oc
    tv = compat.ensure_torchvision()
    assert compat.ensure_torchvision() is tv
    patched = compat.torchvision_patched()
    assert len(patched) == len(set(patched))  # defined once, however often called
    if patched:  # broken wheel here: the placeholders raise a clear error instead of being absent
        with pytest.raises(NotImplementedError, match="placeholder"):
            torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    assert "FrozenBatchNorm2d" in dir(tv.ops.misc)


def test_compat_in_a_fresh_interpreter():
    code = ("import sys, torch\n"
            "try:\n    import torchvision; broken = False\n"
            "except RuntimeError as e:\n    broken = 'torchvision::' in str(e)\n"
            "from tlg.clip.compat import ensure_torchvision, torchvision_patched\n"
            "tv = ensure_torchvision(); import torchvision.transforms.functional\n"
            "print(broken, bool(torchvision_patched()), tv.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    broken, patched, name = out.stdout.split()
    assert name == "torchvision" and broken == patched  # the step is applied exactly when needed


def test_tokenizer_offline(monkeypatch):
    from tlg.clip import model as model_mod

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(model_mod, "_TOKENIZER", None)  # build it again, offline
    ids = tokenize("a photo of a cat.")
    assert ids.shape == (1, 77)
    # <start> a photo of a cat . <end>
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert ids[0, 8:].eq(0).all()


# ---------------------------------------------------------------- loading

@pytest.fixture(scope="module")
def rn50_files(tmp_path_factory):
    """A random full-size RN50 saved as an open_clip training checkpoint and as an OpenAI fp16 state dict."""
    root = tmp_path_factory.mktemp("rn50")
    torch.manual_seed(0)
    model = build_clip("RN50", quick_gelu=True)
    sd = model.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, root / "openclip.pt")
    openai = {k: (v.half() if v.is_floating_point() and "bn" not in k else v) for k, v in sd.items()}
    openai.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(openai, root / "openai_sd.pt")
    return model, root


def test_load_rn50_open_clip_and_openai_state_dicts(rn50_files):
    model, root = rn50_files
    a = load_clip(root / "openclip.pt", "RN50")
    assert a.extra == {"format": "open_clip", "quick_gelu": False} and a.image_size == 224 and not a.is_vit
    _same_weights(model, a.model)
    b = load_clip(root / "openai_sd.pt", "RN50")
    assert b.extra == {"format": "openai", "quick_gelu": True}
    assert b.model.visual.layer1[0].conv1.weight.dtype == torch.float32
    _same_weights(model, b.model, half=True)  # fp16 round trip
    assert load_clip(root / "openai_sd.pt", "auto").arch == "RN50"
    assert a.model_id != b.model_id and a.model_id.startswith("RN50-")


def test_load_rn50_mismatch_is_a_clear_error(rn50_files):
    _, root = rn50_files
    with pytest.raises(CheckpointError) as err:
        load_clip(root / "openclip.pt", "ViT-B/32")
    msg = str(err.value)
    assert "openclip.pt" in msg and "ViT-B/32" in msg and "ModifiedResNet" in msg


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RN], ids=["vit", "rn"])
def test_load_tiny_models_all_formats(cfg, tmp_path):
    torch.manual_seed(1)
    model = build_clip(cfg, quick_gelu=True)
    size = cfg["vision_cfg"]["image_size"]
    torch.save(model.state_dict(), tmp_path / "oc.pt")
    _trace_archive(copy.deepcopy(model), tmp_path / "jit.pt", size)
    x = torch.randn(2, 3, size, size)
    tokens = tokenize(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        ref, ref_text = model.encode_image(x), model.encode_text(tokens)
        for name, fmt in (("oc.pt", "open_clip"), ("jit.pt", "openai")):
            clip = load_clip(tmp_path / name, cfg, quick_gelu=True)
            assert clip.extra["format"] == fmt
            assert torch.allclose(clip.model.encode_image(x), ref, atol=1e-5)
            assert torch.allclose(clip.model.encode_text(tokens), ref_text, atol=1e-5)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*never downloads"):
        load_clip(tmp_path / "missing.pt", "RN50")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_clip(tmp_path / "junk.pt", "ViT-B/16")
    torch.save(build_clip(TINY_VIT).state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match=r"tiny.pt does not fit CLIP ViT-B/16.*ViT \(width 64"):
        load_clip(tmp_path / "tiny.pt", "ViT-B/16")
    with pytest.raises(CheckpointError, match="cannot tell the architecture.*ViT \\(width 64"):
        load_clip(tmp_path / "tiny.pt", "auto")
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        load_clip(tmp_path / "tiny.pt", "ViT-L/14")


# ---------------------------------------------------------------- prompts, text cache

def test_prompts_cover_voc_and_coco():
    from tlg.clip import prompts

    assert len(prompts.VOC_PROMPTS) == 20 and len(prompts.COCO_PROMPTS) == 80
    assert prompts.class_prompt("Dining_Table") is prompts.VOC_PROMPTS["diningtable"]
    assert "water" in prompts.background_concepts("boat")
    assert prompts.foreground_texts("cat")[0] == "a photo of a cat."
    assert prompts.class_prompt("striped_red_disk").names == ("striped red disk",)
    for p in list(prompts.VOC_PROMPTS.values()) + list(prompts.COCO_PROMPTS.values()):
        assert p.names and p.background


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(2)
    return wrap_model(build_clip(TINY_VIT, quick_gelu=True), "tiny-vit")


def test_text_embeddings_are_cached(tiny_vit, tmp_path, monkeypatch):
    from tlg.clip import text

    calls = []
    original = tiny_vit.model.encode_text
    monkeypatch.setattr(tiny_vit.model, "encode_text", lambda t: calls.append(len(t)) or original(t))
    first = text.class_embeddings(tiny_vit, ["cat", "dog"], cache_dir=tmp_path)
    assert first.shape == (2, 32) and torch.allclose(first.norm(dim=-1), torch.ones(2))
    assert calls and (tmp_path / "text" / f"{tiny_vit.model_id}.pt").is_file()
    text._MEMORY.clear()  # a new process: read back from disk
    calls.clear()
    again = text.class_embeddings(tiny_vit, ["dog", "cat"], cache_dir=tmp_path)
    assert calls == [] and torch.equal(again, first.flip(0))
    text.encode_texts(tiny_vit, ["a new prompt."], cache_dir=tmp_path)
    assert calls == [1]


# ---------------------------------------------------------------- Grad-CAM

class RegionCLIP(torch.nn.Module):
    """A CLIP-like image tower whose embedding depends on one known region of the feature grid only:
    features = ReLU(4x4 average pool of the image) (channel k = colour k), embedding = mean of the
    features over ``region`` (grid cells), embedding space = RGB."""

    def __init__(self, region):
        super().__init__()
        self.region = region

    def forward(self, images):
        acts = F.relu(F.avg_pool2d(images, 4))
        mask = torch.zeros(acts.shape[-2:])
        mask[self.region] = 1.0
        emb = (acts * mask).sum(dim=(2, 3)) / mask.sum()
        return emb, acts


def _scene(objects, size=(48, 80)):
    """uint8 image: blue background, ``objects`` = [(colour index, rows slice, cols slice)]."""
    img = torch.zeros(3, *size, dtype=torch.uint8)
    img[2] = 255
    for colour, rows, cols in objects:
        img[:, rows, cols] = 0
        img[colour, rows, cols] = 255
    return img


def _peak(cam):
    idx = int(cam.argmax())
    return divmod(idx, cam.shape[1])


@pytest.mark.parametrize("mode", ["gradcam", "hirescam"])
def test_gradcam_peaks_in_the_region_the_embedding_depends_on(mode):
    from tlg.clip.gradcam import gradcam, prepare_images, upsample_cams

    # input 32x32 -> 8x8 grid; region = grid rows 1..3, cols 5..7 = image rows 6..24, cols 50..80 (top right)
    encoder = RegionCLIP((slice(1, 4), slice(5, 8)))
    red = torch.tensor([[1.0, 0.0, 0.0]])
    green = torch.tensor([[0.0, 1.0, 0.0]])
    objects = [(0, slice(8, 20), slice(55, 75))]  # the red object, inside the region
    if mode == "hirescam":  # the same red object outside the region: only the region's lights up
        objects.append((0, slice(30, 44), slice(5, 25)))
    else:  # Grad-CAM weights channels globally; a green distractor outside the region stays dark
        objects.append((1, slice(30, 44), slice(5, 25)))
    img = _scene(objects)
    x = prepare_images([img], 32, mean=(0, 0, 0), std=(1, 1, 1))
    cams, scores = gradcam(encoder, x, red, [green], logit_scale=10.0, softmax=True, mode=mode)
    (cam,) = upsample_cams(cams, [img.shape[-2:]])
    assert cam.shape == (48, 80) and float(cam.max()) == pytest.approx(1.0)
    r, c = _peak(cam)
    assert 8 <= r < 20 and 55 <= c < 75
    inside = cam[8:20, 55:75].mean()
    assert cam[30:44, 5:25].max() < 0.05 * inside  # the other object (outside the region) is dark
    assert cam[40:, 40:50].max() < 0.05  # background


def test_clip_cam_encoder_matches_open_clip(tiny_vit):
    from tlg.clip.gradcam import ClipCamEncoder

    torch.manual_seed(3)
    rn = wrap_model(build_clip(TINY_RN, quick_gelu=True), "tiny-rn")
    for clip, grid in ((tiny_vit, 4), (rn, 2)):
        x = torch.randn(2, 3, clip.image_size, clip.image_size)
        emb, acts = ClipCamEncoder(clip)(x)
        assert acts.shape[-2:] == (grid, grid) and acts.requires_grad
        assert torch.allclose(emb, clip.model.encode_image(x), atol=1e-5)
        # a non-native input size: positional embeddings interpolated, a finer grid
        emb2, acts2 = ClipCamEncoder(clip)(torch.randn(1, 3, 2 * clip.image_size, 2 * clip.image_size))
        assert acts2.shape[-2:] == (2 * grid, 2 * grid) and torch.isfinite(emb2).all()


def test_compute_cams_batched_equals_one_by_one(tiny_vit, tmp_path):
    from tlg.clip.gradcam import compute_cams

    g = torch.Generator().manual_seed(4)
    imgs = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((40, 56), (33, 30), (64, 64))]
    names, others = ["cat", "dog", "bird"], [["dog"], ["cat"], []]
    together = compute_cams(tiny_vit, imgs, names, others, batch_size=3, cache_dir=tmp_path)
    alone = [compute_cams(tiny_vit, [i], [n], [o], batch_size=1, cache_dir=tmp_path)[0]
             for i, n, o in zip(imgs, names, others)]
    for a, b, img in zip(together, alone, imgs):
        assert a.shape == img.shape[-2:] and a.min() >= 0 and a.max() <= 1
        assert torch.allclose(a, b, atol=1e-4)


def test_pseudo_mask_api_and_data_provider(tiny_vit, tmp_path, monkeypatch):
    from tlg.clip import pseudo_mask

    monkeypatch.delenv("TLG_CLIP_WEIGHTS", raising=False)
    img = torch.randint(0, 256, (3, 30, 45), dtype=torch.uint8)
    soft = pseudo_mask(img, "cat", clip=tiny_vit, cache_dir=tmp_path)
    hard = pseudo_mask(img, "cat", clip=tiny_vit, cache_dir=tmp_path, threshold=0.5)
    assert soft.shape == hard.shape == (30, 45) and 0 <= soft.min() and soft.max() <= 1
    assert torch.equal(hard, (soft >= 0.5).float())
    with pytest.raises(ValueError, match="clip_weights"):
        pseudo_mask(img, "cat")
    masks = pytest.importorskip("tlg.data.masks")
    provider = masks.ClipGradCAM(clip=tiny_vit, cache_dir=tmp_path)
    src = ToySource(1)
    out = provider(src, src.records[0], src.images[src.records[0].image_id])
    assert out.shape == src.images[src.records[0].image_id].shape[-2:]


# ---------------------------------------------------------------- the tool

class ToySource:
    """A small SegmentationSource: noise images with rectangles, classes cat/dog/bird, ground truth."""

    name = "toy"
    class_names = ["background", "cat", "dog", "bird"]
    classes = [1, 2, 3]

    def __init__(self, n=5):
        from tlg.data.base import Record

        g = torch.Generator().manual_seed(5)
        self.images, self.masks, self.records = {}, {}, []
        for i in range(n):
            h, w = 24 + 8 * (i % 3), 40 - 4 * (i % 2)
            image_id = f"img{i:02d}"
            self.images[image_id] = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
            present = [1 + i % 3] + ([1 + (i + 1) % 3] if i % 2 == 0 else [])
            for k, c in enumerate(present):
                m = torch.zeros(h, w, dtype=torch.uint8)
                m[2 + k * 8: 12 + k * 8, 3 + 10 * k: 20 + 10 * k] = 1
                m[0, :] = 255
                self.masks[(image_id, c)] = m
                self.records.append(Record(image_id, c))

    def load_image(self, image_id):
        return self.images[image_id]

    def load_mask(self, image_id, class_id):
        return self.masks[(image_id, class_id)]

    def __len__(self):
        return len(self.records)


def test_generate_png_layout_and_report(tiny_vit, tmp_path):
    from tlg.clip.pseudomasks import generate, output_path, read_pseudo_mask

    src = ToySource()
    out = tmp_path / "out"
    res = generate(src, tiny_vit, out, threshold=0.4, batch_size=3, cache_dir=tmp_path / "cache", progress=False)
    assert res.written == len(src.records) and res.skipped == 0
    for rec in src.records:
        path = out / src.class_names[rec.class_id] / f"{rec.image_id}.png"
        assert path == output_path(out, src, rec.image_id, rec.class_id)
        values = np.array(Image.open(path))
        assert values.shape == tuple(src.images[rec.image_id].shape[-2:]) and set(np.unique(values)) <= {0, 255}
        assert read_pseudo_mask(path, threshold=0.4).max() <= 1
    report = json.loads((out / "quality.json").read_text())
    assert report == res.report and {r["class_name"] for r in report["classes"]} == {"cat", "dog", "bird"}
    assert 0.0 <= report["miou"] <= 1.0
    assert (out / "quality.csv").read_text().splitlines()[0] == "class_id,class_name,iou,intersection,union"
    with pytest.raises(ValueError, match="other settings"):
        generate(src, tiny_vit, out, threshold=0.6, cache_dir=tmp_path / "cache", progress=False)


def test_generate_pt_and_tlg_repo_layouts(tiny_vit, tmp_path):
    from tlg.clip.pseudomasks import generate

    src = ToySource(3)
    res = generate(src, tiny_vit, tmp_path / "pt", fmt="pt", cache_dir=tmp_path / "c", progress=False)
    payload = torch.load(tmp_path / "pt" / "cat" / "img00.pt", weights_only=True)
    assert payload["cam"].dtype == torch.float16 and payload["mask"].shape == (24, 40)
    assert payload["class_id"] == 1 and res.report is not None

    generate(src, tiny_vit, tmp_path / "repo", layout="tlg-repo", threshold=0.3, cache_dir=tmp_path / "c",
             progress=False)
    values = np.array(Image.open(tmp_path / "repo" / "img00--1.png"))  # dog = class 2 -> "--1", pixels 2
    assert set(np.unique(values)) <= {0, 2}

    generate(src, tiny_vit, tmp_path / "soft", soft=True, cache_dir=tmp_path / "c", progress=False)
    grey = np.array(Image.open(tmp_path / "soft" / "cat" / "img00.png"))
    assert grey.max() == 255 and len(np.unique(grey)) > 2  # the soft CAM as grey levels, peak = 255

    src.name = "coco"  # the TLG code's COCO layout: one label map per image
    generate(src, tiny_vit, tmp_path / "coco", layout="tlg-repo", threshold=0.3, cache_dir=tmp_path / "c",
             progress=False)
    labels = np.array(Image.open(tmp_path / "coco" / "img00.png"))
    assert set(np.unique(labels)) <= {0, 1, 2} and len(list((tmp_path / "coco").glob("*.png"))) == 3


def test_generate_resumes_after_an_interruption(tiny_vit, tmp_path, monkeypatch):
    from tlg.clip import pseudomasks

    src = ToySource()
    out = tmp_path / "out"
    original = pseudomasks._save_file
    writes: list[str] = []

    def crashing(path, write):  # the 4th mask write dies half-way through its temp file
        if path.suffix != ".png":
            return original(path, write)
        if len([w for w in writes if w.endswith(".png")]) == 3:
            def half(tmp):
                Path(tmp).write_bytes(b"\x89PNG half")
                raise KeyboardInterrupt("killed")
            return original(path, half)
        writes.append(str(path))
        return original(path, write)

    monkeypatch.setattr(pseudomasks, "_save_file", crashing)
    with pytest.raises(KeyboardInterrupt):
        pseudomasks.generate(src, tiny_vit, out, batch_size=2, cache_dir=tmp_path / "c", progress=False)
    first = list(writes)
    assert len(first) == 3
    assert not list(out.rglob("*.part")) and len(list(out.rglob("*.png"))) == 3  # nothing half-written

    def counting(path, write):
        writes.append(str(path))
        return original(path, write)

    monkeypatch.setattr(pseudomasks, "_save_file", counting)
    res = pseudomasks.generate(src, tiny_vit, out, batch_size=2, cache_dir=tmp_path / "c", progress=False)
    masks = [w for w in writes if w.endswith(".png")]
    assert len(masks) == len(set(masks)) == len(src.records)  # each file written exactly once overall
    assert res.written == len(src.records) - 3 and res.skipped == 3
    assert len(list(out.rglob("*.png"))) == len(src.records) and not list(out.rglob("*.part"))
    for path in out.rglob("*.png"):
        np.array(Image.open(path))  # every file complete and readable
    assert res.report is not None and len(res.report["classes"]) == 3  # resumed files are scored too


def test_cli_pseudo_masks(rn50_files, tmp_path, capsys):
    import argparse

    from tlg.clip.cli import add_parser, main

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pseudo-masks", "--dataset", "synthetic", "--clip-weights", "w.pt", "--out", "o",
                              "--arch", "ViT-B/16", "--format", "pt", "--threshold", "0.3"])
    assert args.arch == "ViT-B/16" and args.format == "pt" and args.threshold == 0.3 and callable(args.func)

    assert main(["pseudo-masks", "--dataset", "synthetic", "--clip-weights", str(tmp_path / "none.pt"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "CLIP weights not found" in capsys.readouterr().err

    pytest.importorskip("tlg.data")
    _, root = rn50_files
    out = tmp_path / "syn"
    rc = main(["pseudo-masks", "--dataset", "synthetic", "--split", "val", "--clip-weights", str(root / "openclip.pt"),
               "--out", str(out), "--limit", "2", "--cache-dir", str(tmp_path / "c"), "--batch-size", "4",
               "--no-background"])
    assert rc == 0
    assert (out / "quality.json").is_file() and len(list(out.rglob("*.png"))) >= 2
    assert "mIoU" in capsys.readouterr().out
