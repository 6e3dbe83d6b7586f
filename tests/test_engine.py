"""tlg.engine: metrics against hand-computed cases, evaluation, bit-exact resume, DDP with gloo,
mixed precision, checkpoints and panels. Uses a tiny stand-in model (a few convs) for speed."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tlg.data import EpisodeDataset, SyntheticCAM, build_source, collate_episodes
from tlg.engine import (FewShotMeter, TrainConfig, Trainer, evaluate, intersection_and_union, load_checkpoint,
                        pseudo_mask_predictor, save_atomic, save_episode_panel)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest single-threaded (the demo uses 1 thread too)."""


class TinySegmenter(nn.Module):
    """Stand-in with the tlg model interface: prototype matching on a 2-conv encoder."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(dropout),
                                     nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Conv2d(9, 2, 3, padding=1)

    def forward(self, batch):
        query = self.encoder(batch["query_img"])
        logits = 0
        for k in range(batch["support_imgs"].shape[1]):
            support = self.encoder(batch["support_imgs"][:, k])
            mask = batch["support_masks"][:, k : k + 1]
            prototype = (support * mask).sum((2, 3)) / mask.sum((2, 3)).clamp_min(1)
            similarity = F.cosine_similarity(query, prototype[..., None, None], dim=1)[:, None]
            logits = logits + self.head(torch.cat([query, similarity], 1))
        return logits / batch["support_imgs"].shape[1]

    def loss(self, batch):
        logits = self(batch)
        return F.cross_entropy(logits, batch["query_mask"], ignore_index=255), logits

    @torch.no_grad()
    def predict(self, batch):
        return self(batch).argmax(1)


# --- metrics --------------------------------------------------------------------------------------
def test_intersection_and_union_by_hand():
    pred = torch.tensor([[[1, 1, 0], [0, 0, 0]]])
    target = torch.tensor([[[1, 0, 0], [255, 1, 0]]])
    inter, union = intersection_and_union(pred, target)
    # valid pixels: 5 (one ignored). fg: pred {0,1}, gt {0,4} -> I=1, U=3; bg: pred {2,4,5}, gt {1,2,5} -> I=2, U=4
    assert inter.tolist() == [[2, 1]] and union.tolist() == [[4, 3]]


def test_meter_sums_per_class_then_averages():
    meter = FewShotMeter(class_ids=[1, 2], num_classes=3)
    # class 1: two episodes with fg (I, U) = (1, 2) and (3, 4) -> IoU 4/6; class 2: (0, 5) -> 0
    meter.add(torch.tensor([[5, 1], [6, 3]]), torch.tensor([[7, 2], [8, 4]]), torch.tensor([1, 1]))
    meter.add(torch.tensor([[10, 0]]), torch.tensor([[15, 5]]), torch.tensor([2]))
    assert meter.class_iou() == pytest.approx({1: 400 / 6, 2: 0.0})
    assert meter.miou() == pytest.approx((4 / 6 + 0) / 2 * 100)
    # FB-IoU: bg 21/30, fg 4/11, averaged
    assert meter.fb_iou() == pytest.approx((21 / 30 + 4 / 11) / 2 * 100)
    assert meter.episodes == 3
    meter.add(torch.tensor([[1, 1]]), torch.tensor([[1, 1]]), torch.tensor([0]))  # class 0 is not of interest
    assert meter.miou() == pytest.approx((4 / 6 + 0) / 2 * 100)


def test_perfect_and_empty_predictions():
    source = build_source("synthetic", fold=0, split="val", num_images=20, image_size=32)
    dataset = EpisodeDataset(source, shot=1, size=32, episodes=30)
    perfect = evaluate(lambda b: (b["query_mask"] == 1).long(), dataset, batch_size=8, progress=False)
    assert perfect.miou() == pytest.approx(100) and perfect.fb_iou() == pytest.approx(100)
    empty = evaluate(lambda b: torch.zeros_like(b["query_mask"]), dataset, batch_size=8, progress=False)
    assert empty.miou() == 0 and 0 < empty.fb_iou() < 100
    cam = SyntheticCAM()
    weak = EpisodeDataset(source, shot=1, size=32, episodes=30, query_pseudo_masks=cam)
    assert 20 < evaluate(pseudo_mask_predictor(), weak, batch_size=8, progress=False).miou() < 90


def test_evaluation_at_original_size():
    source = build_source("synthetic", fold=0, split="val", num_images=10, image_size=48)
    dataset = EpisodeDataset(source, shot=1, size=24, episodes=6, keep_original=True)
    meter = evaluate(TinySegmenter(), dataset, batch_size=3, original_size=True, progress=False)
    # scored at 48x48: per pixel, I_bg + I_fg + U_bg + U_fg = 2
    assert meter.episodes == 6 and int(meter.union.sum() + meter.intersection.sum()) == 2 * 6 * 48 * 48


# --- training -------------------------------------------------------------------------------------
def _datasets(episodes: int = 16, size: int = 24):
    trn = build_source("synthetic", fold=0, split="trn", num_images=60, image_size=size)
    val = build_source("synthetic", fold=0, split="val", num_images=12, image_size=size)
    return (EpisodeDataset(trn, shot=1, size=size, episodes=episodes, support_masks=SyntheticCAM()),
            EpisodeDataset(val, shot=1, size=size, episodes=8))


def _train(out_dir, epochs, resume=False, fail_at_epoch=None, **config):
    torch.manual_seed(1234)  # only the init; the trainer seeds the run itself
    train_set, val_set = _datasets()
    trainer = Trainer(TinySegmenter(), train_set, val_set,
                      TrainConfig(out_dir=str(out_dir), epochs=epochs, batch_size=4, progress=False, **config),
                      model_spec={"name": "tiny"})
    if fail_at_epoch is not None:
        original = trainer.train_epoch

        def train_epoch(epoch):
            if epoch == fail_at_epoch:
                raise KeyboardInterrupt("killed")
            return original(epoch)

        trainer.train_epoch = train_epoch
    trainer.fit(resume=resume)
    return trainer


def test_resume_is_bit_identical(tmp_path):
    straight = _train(tmp_path / "straight", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "resumed", epochs=3, fail_at_epoch=1)  # dies after epoch 1's checkpoint
    assert load_checkpoint(str(tmp_path / "resumed" / "last.pt"))["epoch"] == 1
    resumed = _train(tmp_path / "resumed", epochs=3, resume=True)
    assert resumed.epoch == straight.epoch == 3 and resumed.step == straight.step
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.optimizer.state_dict()["state"].values(), resumed.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]
    lines = (tmp_path / "resumed" / "metrics.csv").read_text().strip().splitlines()
    assert lines[0].startswith("epoch,") and len(lines) == 4
    assert (tmp_path / "straight" / "best.pt").is_file()
    assert list((tmp_path / "straight" / "tensorboard").iterdir())
    assert not [f for f in os.listdir(tmp_path / "straight") if f.startswith(".tmp-")]


def test_training_reduces_the_loss_with_bf16_autocast_and_clipping(tmp_path):
    trainer = _train(tmp_path, epochs=3, precision="bf16", grad_clip=0.5, lr=5e-3, tensorboard=False)
    losses = [row["train_loss"] for row in trainer.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert trainer.amp_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        _train(tmp_path / "x", epochs=1, precision="fp16")


def test_atomic_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt" / "last.pt")
    save_atomic({"a": torch.ones(2)}, path)
    save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.zeros(2))
    assert os.listdir(tmp_path / "ckpt") == ["last.pt"]
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="broken.pt"):
        load_checkpoint(str(tmp_path / "broken.pt"))


def test_panel_png(tmp_path):
    _, val_set = _datasets()
    batch = collate_episodes([val_set[0], val_set[1]])
    path = save_episode_panel(str(tmp_path / "panel.png"), batch, batch["query_mask"].clamp(max=1), index=1)
    from PIL import Image

    with Image.open(path) as image:
        assert image.mode == "RGB" and image.width > 3 * 24


# --- distributed ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = TinySegmenter(dropout=0.0)
        _, val_set = _datasets()
        meter = evaluate(model, val_set, batch_size=3, progress=False)
        train_set, _ = _datasets(episodes=8)
        trainer = Trainer(model, train_set, None, TrainConfig(out_dir=out_dir, epochs=1, batch_size=2,
                                                              progress=False, tensorboard=False))
        trainer.fit()
        weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()  # no shared tensors
        queue.put((rank, meter.miou(), meter.fb_iou(), meter.episodes, weights))
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_matches_a_single_process(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    _, val_set = _datasets()
    single = evaluate(TinySegmenter(dropout=0.0), val_set, batch_size=3, progress=False)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), queue), nprocs=2, join=True)
    results = sorted(queue.get() for _ in range(2))
    for _, miou, fb_iou, episodes, _ in results:
        assert miou == pytest.approx(single.miou(), abs=1e-9)
        assert fb_iou == pytest.approx(single.fb_iou(), abs=1e-9)
        assert episodes == single.episodes == 8
    assert results[0][4] == results[1][4]  # DDP kept the replicas in sync
    assert (tmp_path / "last.pt").is_file()


def test_time_limit_stops_after_a_step_with_a_checkpoint(tmp_path):
    trainer = _train(tmp_path, epochs=3, time_limit=1e-6, tensorboard=False)
    assert trainer.stopped_early and trainer.step == 1 and trainer.epoch == 1
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 1


def test_support_mask_predictor_pastes_the_first_support_mask_at_query_size():
    from tlg.engine import support_mask_predictor

    support = torch.zeros(2, 3, 8, 8)
    support[0, 0, :4] = 1.0   # first shot counts; other shots are ignored
    support[0, 1] = 1.0
    support[1, 0, :, :2] = 0.6
    batch = {"support_masks": support, "query_img": torch.zeros(2, 3, 16, 16)}
    pred = support_mask_predictor()(batch)
    assert pred.shape == (2, 16, 16) and pred.dtype == torch.long
    assert pred[0, :7].all() and not pred[0, 9:].any()
    assert pred[1, :, 0].all() and not pred[1, :, 8:].any()
