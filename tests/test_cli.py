"""The ``tlg`` command line: demo smoke test, train -> eval -> predict, bench, ``python -m tlg``."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tlg
from tlg import cli

pytestmark = pytest.mark.skipif("hsnet" not in tlg.list_models(), reason="needs tlg.models' hsnet")
SIZE = "48"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest single-threaded (the demo uses 1 thread too)."""


def test_demo_smoke(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "2", "--epochs", "1", "--batch-size", "2", "--episodes", "4",
                     "--img-size", SIZE, "--train-images", "60", "--test-images", "20", "--eval-batch-size", "4",
                     "--panel-rows", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("trained model", "untrained model", "support pseudo-mask pasted as answer", "query's own pseudo-mask as answer"):
        assert row in out
    assert "4 episodes" in out
    with Image.open(tmp_path / "demo_panel.png") as panel:
        assert panel.height > 2 * int(SIZE)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "metrics.csv").is_file()


def test_train_eval_predict(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--img-size", SIZE, "--support-masks", "synthetic-cam"]
    assert cli.main(["train", "--model", "hsnet", "--backbone", "resnet_tiny", "--epochs", "1", "--batch-size", "2",
                     "--train-episodes", "4", "--val-episodes", "4", "--out", str(run), "--quiet", *common]) == 0
    assert "done: epoch 1" in capsys.readouterr().out
    assert cli.main(["train", "--model", "hsnet", "--backbone", "resnet_tiny", "--epochs", "2", "--batch-size", "2",
                     "--train-episodes", "4", "--val-episodes", "0", "--out", str(run), "--quiet", "--resume",
                     *common]) == 0
    assert "done: epoch 2" in capsys.readouterr().out

    assert cli.main(["eval", "--checkpoint", str(run / "last.pt"), "--folds", "0", "1", "--episodes", "4",
                     "--batch-size", "2", "--panel", str(tmp_path / "panel{fold}.png"), *common]) == 0
    table = capsys.readouterr().out
    assert "fold" in table and "mIoU" in table and "FB-IoU" in table and "mean" in table
    assert (tmp_path / "panel0.png").is_file() and (tmp_path / "panel1.png").is_file()
    assert cli.main(["eval", "--baseline", "pseudo-mask", "--folds", "2", "--episodes", "4", *common]) == 0
    assert "synthetic 1-shot, 4 episodes" in capsys.readouterr().out

    from tlg.data import build_source

    source = build_source("synthetic", fold=0, split="val", num_images=10)
    paths = {}
    for name, record in (("support", source.records[0]), ("query", source.records[1])):
        paths[name] = str(tmp_path / f"{name}.png")
        Image.fromarray(source.load_image(record.image_id).permute(1, 2, 0).numpy()).save(paths[name])
    mask = source.load_mask(source.records[0].image_id, source.records[0].class_id).numpy() * 255
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "support_mask.png")
    assert cli.main(["predict", "--checkpoint", str(run / "last.pt"), "--support", paths["support"],
                     "--support-mask", str(tmp_path / "support_mask.png"), "--class", "thing",
                     "--query", paths["query"], "--img-size", SIZE, "--out", str(tmp_path / "pred")]) == 0
    with Image.open(tmp_path / "pred" / "query_mask.png") as written:
        assert written.size == (128, 128) and set(np.unique(np.asarray(written))) <= {0, 255}
    assert (tmp_path / "pred" / "query_overlay.png").is_file()


def test_bench_runs_the_quick_benchmarks_in_a_checkout(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command, cwd=None: calls.append((command, cwd)) or 0)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(cli.os.path, "isdir", lambda path: True)
    assert cli.main(["bench"]) == 0
    command, cwd = calls[0]
    assert command[1:4] == ["-m", "pytest", os.path.join(cwd, "benchmarks")]
    assert command[4:] == ["--benchmark-only", "-q", "-k", "quick"]


def test_python_dash_m_and_errors():
    result = subprocess.run([sys.executable, "-m", "tlg", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("train", "eval", "predict", "demo", "bench"):
        assert command in result.stdout
    with pytest.raises(SystemExit, match="--checkpoint"):
        cli.main(["eval", "--folds", "0", "--episodes", "2"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--option", "novalue"])
    with pytest.raises(SystemExit, match="--query-pseudo-masks"):  # TLG's head needs query pseudo-masks
        cli.main(["train", "--model", "tlg", "--backbone", "resnet_tiny", "--img-size", SIZE])


def test_eval_on_fss_follows_its_protocol(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("ant", "bee"):
        (tmp_path / name).mkdir()
        for n in range(1, 4):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / name / f"{n}.jpg")
            mask = np.zeros((20, 20), np.uint8)
            mask[3:15, 5:12 + n] = 255
            Image.fromarray(mask).save(tmp_path / name / f"{n}.png")
    assert cli.main(["eval", "--dataset", "fss", "--root", str(tmp_path), "--baseline", "pseudo-mask",
                     "--support-masks", "synthetic-cam", "--img-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "fss 1-shot, 6 episodes per fold" in out  # one episode per test image, a single "fold"
    assert len([line for line in out.splitlines() if line.strip().startswith("0 ")]) == 1


def test_builtin_bench(capsys):
    assert cli.main(["bench", "--builtin", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    for kernel in ("correlation", "cp_conv4d", "sinkhorn"):
        assert kernel in out
    assert "auto picks" in out
