"""The front doors of tlg.ops: validation, backend selection, the HSNet-compatible module."""
import pytest
import torch

import tlg
from tlg import ops
from tlg.ops import _backends, reference as R


def _corr_args():
    return torch.randn(2, 4, 3, 3), torch.randn(2, 4, 5, 5)


def _conv_args(cin=2, cout=3, k=3):
    return (torch.randn(1, cin, 4, 4, 5, 5), torch.randn(cout, cin, k, k), torch.randn(cout),
            torch.randn(cout, cin, k, k), torch.randn(cout))


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,exc,words", [
    (lambda q, s: ops.correlation(q[0], s), ValueError, "query must be 4-D"),
    (lambda q, s: ops.correlation(q, s[:1]), ValueError, "batch and channels"),
    (lambda q, s: ops.correlation(q, s[:, :3]), ValueError, "batch and channels"),
    (lambda q, s: ops.correlation(q.long(), s.long()), TypeError, "query must be a floating tensor"),
    (lambda q, s: ops.correlation(q, s.double()), TypeError, "share a dtype"),
    (lambda q, s: ops.correlation(q, s, torch.ones(3, 5, 5)), ValueError, "support_mask batch"),
    (lambda q, s: ops.correlation(q, s, torch.ones(2, 5)), ValueError, "support_mask must be 3-D"),
    (lambda q, s: ops.correlation(q, s, torch.ones(2, 5, 5, device="meta")), ValueError, "one device"),
    (lambda q, s: ops.correlation(q, s, eps=0), ValueError, "eps must be > 0"),
    (lambda q, s: ops.correlation(q.numpy(), s), TypeError, "query must be a torch.Tensor"),
    (lambda q, s: ops.multilayer_correlation([q], [s, s], [1]), ValueError, "same layers"),
    (lambda q, s: ops.multilayer_correlation([q, q], [s, s], [2, 1]), ValueError, "stack_ids"),
])
def test_correlation_bad_input(call, exc, words):
    q, s = _corr_args()
    with pytest.raises(exc, match=words):
        call(q, s)


@pytest.mark.parametrize("mutate,exc,words", [
    (lambda a: (a[0][0],) + a[1:], ValueError, "x must be 6-D"),
    (lambda a: (a[0].int(),) + a[1:], TypeError, "x must be a floating tensor"),
    (lambda a: (a[0], a[1][:, :1]) + a[2:], ValueError, "weight_q has 1 input channels"),
    (lambda a: (a[0], a[1], a[2], a[3][:2], a[4]), ValueError, "same out channels"),
    (lambda a: (a[0], torch.randn(3, 2, 2, 2)) + a[2:], ValueError, "odd square kernel"),
    (lambda a: (a[0], a[1], a[2][:2]) + a[3:], ValueError, "bias_q has 2 entries"),
    (lambda a: (a[0], a[1].double()) + a[2:], TypeError, "weight_q dtype"),
    (lambda a: a[:4] + (a[4].to("meta"),), ValueError, "one device"),
])
def test_cp_conv4d_bad_input(mutate, exc, words):
    with pytest.raises(exc, match=words):
        ops.cp_conv4d(*mutate(_conv_args()), 2)


@pytest.mark.parametrize("stride", [0, -1, 1.5, True])
def test_cp_conv4d_bad_stride(stride):
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        ops.cp_conv4d(*_conv_args(), stride)


def _sk_args():
    return torch.rand(2, 4, 3), torch.full((2, 4), 0.25), torch.full((2, 3), 1 / 3)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(cost=torch.rand(4, 3)), ValueError, "cost must be 3-D"),
    (dict(cost=torch.ones(2, 4, 3, dtype=torch.int64)), TypeError, "cost must be a floating tensor"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(eps=-1.0), ValueError, "eps must be > 0"),
    (dict(a=torch.tensor([[0.5, 0.5, 0.25, -0.25]] * 2)), ValueError, "a has negative entries"),
    (dict(b=torch.full((2, 3), 0.5)), ValueError, "equal mass"),
    (dict(a=torch.full((2, 5), 0.2)), ValueError, r"a must have shape \(2, 4\)"),
    (dict(a=torch.zeros(2, 4), b=torch.zeros(2, 3)), ValueError, "zero total mass"),
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(check_every=0), ValueError, "check_every"),
    (dict(tol=-1.0), ValueError, "tol must be >= 0"),
    (dict(b=torch.full((2, 3), 1 / 3, device="meta")), ValueError, "one device"),
])
def test_sinkhorn_bad_input(kwargs, exc, words):
    cost, a, b = _sk_args()
    args = dict(cost=cost, a=a, b=b, eps=0.1)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        ops.sinkhorn(args.pop("cost"), args.pop("a"), args.pop("b"), **args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sinkhorn_non_finite_cost(bad):
    cost, a, b = _sk_args()
    cost[1, 2, 0] = bad
    with pytest.raises(ValueError, match="cost contains NaN or Inf"):
        ops.sinkhorn(cost, a, b, eps=0.1)


def test_sinkhorn_single_marginal_must_be_normalised():
    cost, a, _ = _sk_args()
    with pytest.raises(ValueError, match="must sum to 1"):
        ops.sinkhorn(cost, a * 2, eps=0.1)
    res = ops.sinkhorn(cost, a, eps=0.1, backend="reference")  # b defaults to uniform
    torch.testing.assert_close(res.plan.sum(1), torch.full((2, 3), 1 / 3), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ backends
def test_unknown_backend_names_are_rejected(monkeypatch):
    q, s = _corr_args()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.correlation(q, s, backend="fast")
    monkeypatch.setenv("TLG_BACKEND", "fast")
    with pytest.raises(ValueError, match="TLG_BACKEND must be one of"):
        ops.correlation(q, s)


def test_tlg_backend_env_overrides_auto(monkeypatch):
    calls = []
    ref = _backends.get("reference")
    monkeypatch.setattr(ref, "correlation", lambda *a: calls.append("ref") or R.correlation(*a))
    monkeypatch.setenv("TLG_BACKEND", "reference")
    ops.correlation(*_corr_args())
    assert calls == ["ref"]


def test_explicit_backend_that_cannot_run_fails_clearly():
    q, s = _corr_args()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run correlation on cpu"):
        ops.correlation(q, s, backend="cuda")


def test_missing_extension_falls_back_to_reference_and_says_so(monkeypatch):
    class Missing(_backends.Backend):
        name, device_types = "cpp", ("cpu",)

        def load_error(self):
            return "tlg._C not available (ImportError: simulated)"

        def status(self, op):
            return None

    monkeypatch.setitem(_backends._REGISTRY, "cpp", Missing())
    _backends._warn_fallback.cache_clear()
    q, s = _corr_args()
    with pytest.warns(RuntimeWarning, match="all ops run on the pure-PyTorch reference"):
        out = ops.correlation(q, s)
    torch.testing.assert_close(out, R.correlation(q, s))
    info = ops.backend_info()
    assert info["auto"]["cpu"]["correlation"] == "reference"
    assert info["backends"]["cpp"]["available"] is False and "simulated" in info["backends"]["cpp"]["reason"]


def test_backend_info_lists_every_backend_with_levels():
    info = ops.backend_info()
    assert {"reference", "cpp", "cuda"} <= set(info["backends"])
    assert info["backends"]["reference"]["ops"] == {"correlation": "spec", "cp_conv4d": "spec", "group_norm_relu": "spec",
                                                    "sinkhorn": "spec"}
    levels = {"spec", "measured-CPU", "interpreter-verified", "emulation-verified", "compiled-only", "GPU-verified", None}
    for be in info["backends"].values():
        assert set(be["ops"].values()) <= levels
    for op, choice in info["auto"]["cpu"].items():
        assert choice in ("cpp", "reference")


def test_front_doors_match_reference_on_auto():
    q, s = _corr_args()
    mask = (torch.rand(2, 9, 9) > 0.5).float()
    torch.testing.assert_close(ops.correlation(q, s, mask), R.correlation(q, s, mask), atol=1e-5, rtol=1e-4)
    args = _conv_args()
    torch.testing.assert_close(ops.cp_conv4d(*args, 2), R.cp_conv4d(*args, 2), atol=1e-4, rtol=1e-4)
    cost = torch.rand(3, 5, 4)
    got, want = ops.sinkhorn(cost, eps=0.1), R.sinkhorn(cost, eps=0.1)
    torch.testing.assert_close(got.plan, want.plan, atol=1e-6, rtol=1e-4)


def test_group_norm_relu_runs_the_reference_on_a_backend_without_its_kernel(monkeypatch):
    """A model built for a backend that has cp_conv4d but no GroupNorm + ReLU kernel (Triton, CUDA) still
    runs: that op alone takes the reference. A backend that cannot run on the device at all still fails."""
    class ConvOnly(_backends.Backend):
        name, device_types = "cuda", ("cpu",)

        def status(self, op):
            return "emulation-verified" if op != "group_norm_relu" else None

    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run group_norm_relu on cpu"):
        ops.group_norm_relu(x, 2, backend="cuda")
    monkeypatch.setitem(_backends._REGISTRY, "cuda", ConvOnly())
    torch.testing.assert_close(ops.group_norm_relu(x, 2, backend="cuda"), R.group_norm_relu(x, 2, None, None))


# ------------------------------------------------------------------------------ module
def test_center_pivot_module_has_hsnet_names_and_follows_input_size():
    mod = ops.CenterPivotConv4d(2, 3, (3, 3, 5, 5), (1, 1, 2, 2), (1, 1, 2, 2))
    assert list(mod.state_dict()) == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    assert mod.conv1.weight.shape == (3, 2, 3, 3) and mod.conv2.weight.shape == (3, 2, 5, 5)
    for hb in (7, 13, 4):  # HSNet caches its pruning index; ours must not
        x = torch.randn(1, 2, 3, 3, hb, hb)
        want = R.cp_conv4d(x, mod.conv1.weight, mod.conv1.bias, mod.conv2.weight, mod.conv2.bias, 2)
        torch.testing.assert_close(mod(x), want, atol=1e-5, rtol=1e-4)
    mod.load_state_dict({k: torch.zeros_like(v) for k, v in mod.state_dict().items()})
    assert torch.all(mod(torch.randn(1, 2, 3, 3, 5, 5)) == 0)


@pytest.mark.parametrize("kwargs,words", [
    (dict(kernel_size=(3, 3, 4, 4)), "odd"),
    (dict(kernel_size=(3, 5, 3, 3)), r"\(kq, kq, ks, ks\)"),
    (dict(stride=(2, 2, 2, 2)), r"stride must be \(1, 1, s, s\)"),
    (dict(padding=(0, 0, 0, 0)), "padding must be"),
    (dict(stride=(1, 1, 2)), "4-tuple"),
])
def test_center_pivot_module_rejects_unsupported_configs(kwargs, words):
    args = dict(in_channels=2, out_channels=3, kernel_size=(3, 3, 3, 3), stride=(1, 1, 2, 2), padding=(1, 1, 1, 1))
    args.update(kwargs)
    with pytest.raises(ValueError, match=words):
        ops.CenterPivotConv4d(**args)


def test_package_exposes_version_and_ops():
    assert tlg.__version__ and tlg.ops.correlation is ops.correlation


def test_python_schema_table_matches_csrc_ops_cpp():
    """Triton registers the schemas of tlg.ops._library.SCHEMAS; the native library those of csrc/ops.cpp,
    which adds the CPU-only ones."""
    import pathlib
    import re

    from tlg.ops._library import CPU_ONLY_SCHEMAS, SCHEMAS

    src = (pathlib.Path(__file__).parents[1] / "csrc" / "ops.cpp").read_text()
    native = {}
    for call in re.findall(r'm\.def\(((?:"[^"]*"\s*)+)\)', src):
        text = "".join(re.findall(r'"([^"]*)"', call))
        name = text[: text.index("(")]
        native[name] = " ".join(text[len(name):].split())
    assert native == {k: " ".join(v.split()) for k, v in {**SCHEMAS, **CPU_ONLY_SCHEMAS}.items()}
