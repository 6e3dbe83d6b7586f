"""Backbones: torchvision-compatible names and parameter counts, HSNet's taps, weights loading."""
import pytest
import torch

from tlg.models.backbones import HEAD_PARAMETERS, build_backbone, list_backbones, load_backbone_weights

# torchvision's parameter counts, classification head included (torchvision.models docs)
TORCHVISION_TOTAL = {"resnet50": 25_557_032, "resnet101": 44_549_160, "vgg16": 138_357_544}

# A few torchvision state-dict entries, written down by hand from torchvision's layout.
TORCHVISION_KEYS = {
    "resnet50": {"conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                 "layer2.0.conv2.weight": (128, 128, 3, 3), "layer3.5.bn3.running_mean": (1024,),
                 "layer4.2.conv3.weight": (2048, 512, 1, 1), "layer4.0.downsample.1.num_batches_tracked": ()},
    "vgg16": {"features.0.weight": (64, 3, 3, 3), "features.17.weight": (512, 256, 3, 3),
              "features.28.weight": (512, 512, 3, 3), "features.28.bias": (512,)},
}


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "vgg16"])
def test_parameter_counts_match_torchvision(name):
    bb = build_backbone(name)
    assert _count(bb) + HEAD_PARAMETERS[name] == TORCHVISION_TOTAL[name]
    assert all(not p.requires_grad for p in bb.parameters())


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_torchvision_key_names(name):
    state = build_backbone(name).state_dict()
    for key, shape in TORCHVISION_KEYS[name].items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("name,channels,counts", [
    ("resnet50", (512, 1024, 2048), (4, 6, 3)),
    ("vgg16", (512, 512, 512), (3, 3, 1)),
    ("resnet_tiny", (128, 256, 512), (2, 2, 2)),
])
def test_taps(name, channels, counts):
    bb = build_backbone(name)
    feats = bb(torch.randn(1, 3, 64, 64))
    assert len(feats) == sum(counts) == len(bb.tap_channels)
    expected = [(c, bb.stage_size(64, i)) for i, (c, n) in enumerate(zip(channels, counts)) for _ in range(n)]
    assert [(f.shape[1], f.shape[2]) for f in feats] == expected
    assert bb.stack_ids == [counts[2], counts[2] + counts[1], sum(counts)]
    assert (feats[0] < 0).any()  # taken before the ReLU


def test_tap_ids():
    assert build_backbone("resnet50").stage_taps == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11, 12]]
    assert build_backbone("vgg16").stage_taps == [[0, 1, 2], [3, 4, 5], [6]]
    assert build_backbone("resnet101").stack_ids == [3, 26, 30]


@pytest.mark.parametrize("name,size", [("resnet_tiny", 65), ("resnet_tiny", 100), ("resnet_tiny", 400),
                                       ("vgg16", 65), ("vgg16", 100)])
def test_stage_size_formula(name, size):
    bb = build_backbone(name)
    feats = bb(torch.randn(1, 3, size, size))
    sizes = {tuple(f.shape[-2:]) for f in feats}
    assert {(bb.stage_size(size, s),) * 2 for s in range(3)} == sizes


def test_frozen_batchnorm_stays_in_eval():
    bb = build_backbone("resnet50")
    bb.train()
    assert not any(m.training for m in bb.modules())
    tiny = build_backbone("resnet_tiny")
    tiny.train()
    assert tiny.bn1.training and all(p.requires_grad for p in tiny.parameters())
    assert not build_backbone("resnet_tiny", frozen=True).train().bn1.training


def test_resnet_taps_match_block_by_block():
    """The taps equal the residual sums that a plain forward computes before each ReLU."""
    bb = build_backbone("resnet_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    y = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
    manual = []
    for i, layer in enumerate((bb.layer1, bb.layer2, bb.layer3, bb.layer4)):
        for block in layer:
            idn = y if block.downsample is None else block.downsample(y)
            z = block.bn3(block.conv3(torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(y))))))))
            if i:
                manual.append(z + idn)
            y = torch.relu(z + idn)
    for a, b in zip(bb(x), manual):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_torchvision_state_dict_loads_from_disk(name, tmp_path):
    ref = build_backbone(name)
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in ref.state_dict().items()}
    if name == "resnet50":  # torchvision files carry the classifier
        state.update({"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)})
    else:
        state.update({"classifier.6.weight": torch.randn(1000, 4096), "classifier.6.bias": torch.randn(1000)})
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    bb = build_backbone(name, weights=str(path))
    for k, v in bb.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet_tiny", weights=str(path))


def test_misfitting_weights_name_keys_and_shapes(tmp_path):
    state = build_backbone("resnet_tiny").state_dict()
    state["conv1.weight"] = torch.zeros(3, 3, 7, 7)
    del state["layer4.1.bn3.weight"]
    state["layer9.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_backbone_weights(build_backbone("resnet_tiny"), path)
    msg = str(err.value)
    assert "bad.pth" in msg and "layer4.1.bn3.weight" in msg and "layer9.weight" in msg
    assert "conv1.weight: file (3, 3, 7, 7) vs model (16, 3, 7, 7)" in msg
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        build_backbone("resnet_tiny", weights=str(tmp_path / "junk.pth"))


def test_unknown_backbone():
    with pytest.raises(ValueError, match="resnet_tiny"):
        build_backbone("resnet18")
    assert {"resnet50", "resnet101", "vgg16", "resnet_tiny"} <= set(list_backbones())
