"""Models end to end at small resolution on the CPU: shapes, gradients, parameter counts,
checkpoints, the published module layout, backends, bad input."""
import dataclasses

import pytest
import torch

import tlg
from tlg import ops
from tlg.models import HSNet
from tlg.models.backbones import build_backbone

SIZE = 64


def make_batch(b=2, k=1, size=SIZE, text=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "query_img": torch.randn(b, 3, size, size, generator=g),
        "support_imgs": torch.randn(b, k, 3, size, size, generator=g),
        "support_masks": (torch.rand(b, k, size, size, generator=g) > 0.5).float(),
        "query_mask": (torch.rand(b, size, size, generator=g) > 0.5).long(),
        "query_pseudo_mask": torch.rand(b, size, size, generator=g),
        "class_id": torch.arange(b),
        "class_names": ["cat", "dog", "bird", "cow"][:b],
    }
    batch["support_masks"][..., : size // 2, : size // 2] = 1  # an object, so no layer is all masked
    batch["query_mask"][:, 0] = 255  # an ignored row
    if text:
        batch["text_embeddings"] = torch.nn.functional.normalize(torch.randn(b, 3, 512, generator=g), dim=-1)
    return batch


def build(name, backbone="resnet_tiny", **config):
    if name != "hsnet":
        config.setdefault("img_size", SIZE)
    return tlg.build_model(name, backbone=backbone, **config)


def _cpp_has(*op_names):
    info = ops.backend_info()["backends"].get("cpp", {})
    return info.get("available") and all(info.get("ops", {}).get(op) for op in op_names)


MODEL_OPS = {"hsnet": ("correlation", "cp_conv4d"), "imr_hsnet": ("correlation", "cp_conv4d"),
             "tlg": ("correlation", "cp_conv4d", "sinkhorn")}


# ------------------------------------------------------------------------------------ registry
def test_registry():
    assert tlg.list_models() == ["hsnet", "imr_hsnet", "tlg"]
    with pytest.raises(ValueError, match="available: hsnet, imr_hsnet, tlg"):
        tlg.build_model("pspnet")
    with pytest.raises(TypeError, match="no option.*nshot"):
        tlg.build_model("hsnet", backbone="resnet_tiny", nshot=5)
    for name in tlg.list_models():
        model = build(name)
        assert dataclasses.is_dataclass(model.config) and model.config.backbone == "resnet_tiny"


# ------------------------------------------------------------------- forward, loss, predict
@pytest.mark.parametrize("name", ["hsnet", "tlg", "imr_hsnet"])
def test_forward_backward_predict(name):
    model = build(name)
    batch = make_batch()
    logits = model(batch)
    assert logits.shape == (2, 2, SIZE, SIZE) and torch.isfinite(logits).all()
    loss, logits = model.loss(batch)
    assert loss.dim() == 0 and logits.shape == (2, 2, SIZE, SIZE)
    loss.backward()
    unreached = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not unreached
    model.eval()
    pred = model.predict(make_batch(k=2))
    assert pred.shape == (2, SIZE, SIZE) and pred.dtype == torch.long and set(pred.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("name", ["hsnet", "tlg", "imr_hsnet"])
def test_resnet50_and_vgg16_shapes(name):
    for backbone in ("resnet50", "vgg16"):
        model = build(name, backbone).eval()
        with torch.no_grad():
            assert model(make_batch(b=1)).shape == (1, 2, SIZE, SIZE)


def test_kshot_voting():
    model = build("hsnet").eval()
    batch = make_batch(k=3)
    per_shot = []
    for s in range(3):
        one = dict(batch, support_imgs=batch["support_imgs"][:, s:s + 1], support_masks=batch["support_masks"][:, s:s + 1])
        per_shot.append(model.predict(one))
    votes = sum(per_shot)
    expected = (votes.float() / votes.flatten(1).max(1).values.clamp(min=1).view(-1, 1, 1) >= 0.5).long()
    torch.testing.assert_close(model.predict(batch), expected)


def test_tlg_loss_weights_query_and_support():
    model = build("tlg", dropout=0.0).eval()
    batch = make_batch()
    q_only = build("tlg", dropout=0.0, support_weight=0.0).eval()
    q_only.load_state_dict(model.state_dict())
    loss, _ = model.loss(batch)
    loss_q, _ = q_only.loss(batch)
    assert loss.item() > loss_q.item() > 0  # 1.4 CE_q + 0.6 CE_s vs 1.4 CE_q


def test_imr_steps():
    model = build("imr_hsnet", steps=3).eval()
    batch = make_batch()
    with torch.no_grad():
        q = model.backbone(batch["query_img"])
        s = model.backbone(batch["support_imgs"][:, 0])
        steps = model.forward_shot(batch, q, s, batch["support_masks"][:, 0])
    assert len(steps) == 3 and all(o.support is not None for o in steps)
    assert not torch.allclose(steps[0].query, steps[-1].query)


# ------------------------------------------------------------------------- parameter counts
def test_parameter_counts():
    hsnet = build("hsnet", "resnet50")
    counts = hsnet.parameter_counts()
    backbone = sum(p.numel() for p in hsnet.backbone.parameters())
    assert backbone == 23_508_032  # torchvision resnet50 without fc
    assert counts == {"learnable": 2_573_794, "total": 2_573_794 + backbone}  # HSNet paper: 2.6M learnable
    tiny = build("hsnet").parameter_counts()
    assert tiny["learnable"] == tiny["total"]  # resnet_tiny trains
    tlg_counts = build("tlg", "resnet50").parameter_counts()
    assert tlg_counts["total"] - tlg_counts["learnable"] == backbone
    imr = build("imr_hsnet", "resnet50", img_size=400).parameter_counts()
    # IMR extras over the encoder + decoder: conv1024_512, state, 3 gates, pseudo-mask head
    gates = 3 * ((769 * 512 + 512) + 2 * (32 * 9 * 64 + 64))
    extras = (1024 * 512 + 512) + 128 * 50 * 50 + gates + (3 * 10 + 10 + 10 * 2 + 2)
    assert imr["learnable"] == counts["learnable"] + extras


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", ["hsnet", "tlg", "imr_hsnet"])
def test_state_dict_round_trip(name, tmp_path):
    model = build(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    other = build(name).eval().load_checkpoint(str(path))
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(other(batch), model(batch))


def test_published_checkpoint_format_loads(tmp_path):
    """HSNet's released checkpoints: saved from DataParallel, with the backbone's fc."""
    model = build("hsnet", "resnet50")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state.update({"module.backbone.fc.weight": torch.zeros(1000, 2048), "module.backbone.fc.bias": torch.zeros(1000)})
    torch.save(state, tmp_path / "res101_pas_fold0.pt")
    build("hsnet", "resnet50").load_checkpoint(str(tmp_path / "res101_pas_fold0.pt"))
    state["module.hpn_learner.decoder2.2.weight"] = torch.zeros(3, 64, 3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt(.|\n)*hpn_learner.decoder2.2.weight: file \(3, 64, 3, 3\)"):
        build("hsnet", "resnet50").load_checkpoint(str(tmp_path / "bad.pt"))


def test_tlg_published_checkpoint_format_loads(tmp_path):
    """DataParallel prefix, backbone fc, and a learner decoder the published TLG never uses."""
    model = build("tlg", variant="released")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.hpn_learner.decoder1.0.weight"] = torch.zeros(128, 128, 3, 3)
    torch.save({"state_dict": state}, tmp_path / "tlg.pt")
    build("tlg", variant="released").load_checkpoint(str(tmp_path / "tlg.pt"))
    torch.save({k: v for k, v in state.items() if "voc_conv_bach" not in k}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial.pt(.|\n)*missing keys: voc_conv_bach.bias, voc_conv_bach.weight"):
        build("tlg", variant="released").load_checkpoint(str(tmp_path / "partial.pt"))


def _encoder_spec(inch):
    spec = {}
    blocks = {"encoder_layer4": (inch[0], [3, 3, 3]), "encoder_layer3": (inch[1], [5, 3, 3]),
              "encoder_layer2": (inch[2], [5, 5, 3]), "encoder_layer4to3": (128, [3, 3, 3]),
              "encoder_layer3to2": (128, [3, 3, 3])}
    for name, (cin, kernels) in blocks.items():
        outs = [16, 64, 128] if cin != 128 else [128] * 3
        for i, (cout, k) in enumerate(zip(outs, kernels)):
            c_in = cin if i == 0 else outs[i - 1]
            for conv in ("conv1", "conv2"):
                spec[f"hpn_learner.{name}.{3 * i}.{conv}.weight"] = (cout, c_in, k, k)
                spec[f"hpn_learner.{name}.{3 * i}.{conv}.bias"] = (cout,)
            spec[f"hpn_learner.{name}.{3 * i + 1}.weight"] = (cout,)
            spec[f"hpn_learner.{name}.{3 * i + 1}.bias"] = (cout,)
    return spec


DECODER_SPEC = {"decoder1.0.weight": (128, 128, 3, 3), "decoder1.0.bias": (128,), "decoder1.2.weight": (64, 128, 3, 3),
                "decoder1.2.bias": (64,), "decoder2.0.weight": (64, 64, 3, 3), "decoder2.0.bias": (64,),
                "decoder2.2.weight": (2, 64, 3, 3), "decoder2.2.bias": (2,)}
HEAD_SPEC = {"res.0.weight": (10, 3, 1, 1), "res.0.bias": (10,), "res.2.weight": (2, 10, 1, 1), "res.2.bias": (2,)}


def _spec_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def test_hsnet_module_names_match_published():
    """juhongm999/hsnet model/learner.py: HPNLearner with the decoder inside."""
    expected = _encoder_spec([3, 6, 4]) | {f"hpn_learner.{k}": v for k, v in DECODER_SPEC.items()}
    assert _spec_of(build("hsnet", "resnet50")) == expected


def test_tlg_released_module_names_match_published():
    """jarch-ma/TLG model/TLG.py (ResNet50, 400 px): every module of the published __init__."""
    model = build("tlg", "resnet50", variant="released", img_size=400)
    expected = _encoder_spec([3, 6, 4]) | DECODER_SPEC | HEAD_SPEC | {
        "bn.weight": (128,), "bn.bias": (128,), "bn.running_mean": (128,), "bn.running_var": (128,),
        "bn.num_batches_tracked": (),
        "linear_512_625.weight": (625, 512), "linear_512_625.bias": (625,),
        "conv_512_128.weight": (128, 512, 1, 1), "conv_512_128.bias": (128,),
        "conv_1024_128.weight": (128, 1024, 1, 1), "conv_1024_128.bias": (128,),
        "conv_2048_128.weight": (128, 2048, 1, 1), "conv_2048_128.bias": (128,),
        "conv_2_1.weight": (1, 2, 1, 1), "conv_2_1.bias": (1,),
        "voc_conv_bach.weight": (8, 25, 1, 1), "voc_conv_bach.bias": (8,),
        "coco_conv_batch.weight": (8, 23, 1, 1), "coco_conv_batch.bias": (8,),
        "conv1024_512.weight": (512, 1024, 1, 1), "conv1024_512.bias": (512,),
        "merge.0.weight": (128, 256, 1, 1),
        "proj.weight": (2500, 50),
        "SelfAttention.q.weight": (128, 128), "SelfAttention.kv.weight": (128, 128),
        "SelfAttention.proj.weight": (128, 128), "SelfAttention.proj.bias": (128,),
        "CrossAttention.q_fc.weight": (128, 128), "CrossAttention.k_fc.weight": (128, 128),
        "CrossAttention.v_fc.weight": (128, 128), "CrossAttention.proj.weight": (128, 128),
        "final_cat.weight": (128, 384, 1, 1), "final_cat.bias": (128,),
    }
    assert _spec_of(model) == expected
    paper = _spec_of(build("tlg", "resnet50", img_size=400))
    assert paper["SelfAttention.kv.weight"] == (256, 128)  # standard multi-head attention
    assert not {"voc_conv_bach.weight", "conv1024_512.weight"} & set(paper)


def test_imr_module_names_match_published():
    """Whileherham/IMR-HSNet model/hsnet_imr.py (ResNet50, 400 px)."""
    model = build("imr_hsnet", "resnet50", img_size=400)
    expected = _encoder_spec([3, 6, 4]) | DECODER_SPEC | HEAD_SPEC | {
        "state": (1, 128, 50, 50), "conv1024_512.weight": (512, 1024, 1, 1), "conv1024_512.bias": (512,)}
    for gate in "zrh":
        expected |= {f"conv{gate}0.weight": (512, 769, 1, 1), f"conv{gate}0.bias": (512,),
                     f"conv{gate}1.weight": (64, 32, 3, 3), f"conv{gate}1.bias": (64,),
                     f"conv{gate}2.weight": (64, 32, 3, 3), f"conv{gate}2.bias": (64,)}
    assert _spec_of(model) == expected


# --------------------------------------------------------------------- paper vs released TLG
def test_tlg_released_behaviour():
    batch = make_batch()
    other_masks = dict(batch, support_masks=1 - batch["support_masks"])
    released = build("tlg", variant="released", dropout=0.0).eval()
    paper = build("tlg", dropout=0.0).eval()
    with torch.no_grad():
        # released: the support mask enters only the support head; query logits ignore it
        torch.testing.assert_close(released(batch), released(other_masks))
        assert not torch.allclose(paper(batch), paper(other_masks))
    # released: no gradient reaches HA / HT through the text branch; the paper variant trains them
    for model, reached in ((build("tlg", variant="released", l2_penalty=0.0), False), (build("tlg"), True)):
        model.loss(batch)[0].backward()
        for name in ("final_cat.weight", "CrossAttention.q_fc.weight", "SelfAttention.kv.weight"):
            grad = dict(model.named_parameters())[name].grad
            assert (grad is not None and bool(grad.any())) == reached, name


def test_tlg_residual_is_the_published_resize_then_conv():
    """The residual convolves before resizing (8x less data on ResNet50); the published order,
    resize then 1x1 conv, gives the same values."""
    model = build("tlg").eval()
    mid = torch.randn(2, 256, 5, 7, dtype=torch.float64)
    model.double()
    with torch.no_grad():
        for pool in (model.max_pool, model.avg_pool):
            published = pool(model._reduce(torch.nn.functional.interpolate(mid, size=(16, 16), mode="bilinear",
                                                                           align_corners=True)))
            torch.testing.assert_close(model.residual(mid, (8, 8), pool), published)


def test_tlg_without_clip():
    model = build("tlg", use_clip=False).eval()
    batch = make_batch(text=False)
    assert model(batch).shape == (2, 2, SIZE, SIZE)


# --------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("name", ["hsnet", "tlg", "imr_hsnet"])
def test_reference_and_cpp_backends_agree(name):
    if not _cpp_has(*MODEL_OPS[name]):
        pytest.skip(f"the cpp backend has no kernel yet for one of {MODEL_OPS[name]} "
                    f"(tlg.ops.backend_info()['backends']['cpp']['ops'])")
    ref = build(name, backend="reference").eval()
    cpp = build(name, backend="cpp").eval()
    cpp.load_state_dict(ref.state_dict())
    batch = make_batch(b=1)
    with torch.no_grad():
        torch.testing.assert_close(cpp(batch), ref(batch), rtol=1e-4, atol=1e-4)
    for model in (ref, cpp):  # gradients too (eval mode: no dropout, fixed BatchNorm statistics)
        model.loss(batch)[0].backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    for n, p in cpp.named_parameters():
        if n in grads and ("encoder_layer2.0" in n or "CrossAttention" in n or "decoder1.0" in n):
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-5, msg=n)


# -------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["hsnet", "tlg", "imr_hsnet"])
def test_bad_input(name):
    model = build(name)
    batch = make_batch(k=2)
    with pytest.raises(ValueError, match="shot counts differ.*K=2.*K=1"):
        model(dict(batch, support_masks=batch["support_masks"][:, :1]))
    with pytest.raises(ValueError, match="image sizes differ: query_img is 64x64 but support_imgs are 32x32"):
        model(dict(batch, support_imgs=batch["support_imgs"][..., :32, :32]))
    with pytest.raises(ValueError, match="support_masks are 32x32"):
        model(dict(batch, support_masks=batch["support_masks"][..., :32, :32]))
    with pytest.raises(ValueError, match=r"query_img must be \(B, 3, H, W\)"):
        model(dict(batch, query_img=batch["query_img"][:, :1]))
    with pytest.raises(KeyError, match="support_masks"):
        model({k: v for k, v in batch.items() if k != "support_masks"})
    with pytest.raises(KeyError, match="query_mask"):
        model.loss({k: v for k, v in batch.items() if k != "query_mask"})
    if name != "hsnet":
        with pytest.raises(KeyError, match="query_pseudo_mask"):
            model({k: v for k, v in batch.items() if k != "query_pseudo_mask"})


def test_tlg_bad_input():
    model = build("tlg")
    batch = make_batch()
    with pytest.raises(KeyError, match=r"text_embeddings(.|\n)*class_names"):
        model({k: v for k, v in batch.items() if k != "text_embeddings"})
    with pytest.raises(KeyError, match="no 'class_names' either"):
        model({k: v for k, v in batch.items() if k not in ("text_embeddings", "class_names")})
    with pytest.raises(ValueError, match=r"text_embeddings must be \(B, 3, 512\)"):
        model(dict(batch, text_embeddings=batch["text_embeddings"][:, :2]))
    with pytest.raises(ValueError, match="built for 64x64 images"):
        model(make_batch(size=96))
    with pytest.raises(ValueError, match="variant"):
        build("tlg", variant="published")


def test_frozen_backbone_stays_eval_in_training():
    model = build("hsnet", "resnet50").train()
    assert model.training and not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    assert isinstance(model, HSNet) and build_backbone("resnet_tiny").frozen is False
