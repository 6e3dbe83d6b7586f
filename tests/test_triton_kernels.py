"""Triton backend vs the reference, forward and backward, through the tlg.ops front doors.

Without a GPU these run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports tlgkernels); shapes are small and odd so the interpreter stays quick.
"""
import pytest
import torch

pytest.importorskip("triton")
import tlgkernels  # noqa: E402
import tlgkernels.sinkhorn as tk_sinkhorn  # noqa: E402

if not tlgkernels.INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU, or TRITON_INTERPRET=1 set before tlgkernels is first imported",
                allow_module_level=True)

from tlg import ops  # noqa: E402
from tlg.ops import reference  # noqa: E402

# numpy's log(0) and inf - inf warnings inside the interpreter (masked lanes)
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DEVICE = "cpu" if tlgkernels.INTERPRET else "cuda"
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=1e-2),
       torch.bfloat16: dict(atol=2e-2, rtol=5e-2)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # no bf16 in the interpreter


@pytest.fixture(autouse=True)
def _full_fp32(monkeypatch):
    """On a GPU the reference's cuDNN convolutions would use TF32 by default: compare in full fp32."""
    if DEVICE == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _close(actual, expected, dtype, scale=1.0):
    """allclose with the dtype's tolerance; ``scale`` for quantities of larger magnitude."""
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"])


def _run_both(fn, inputs, grad_out_seed=1):
    """Output and input gradients of ``fn(*inputs, backend=...)`` for triton and reference."""
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
        out = fn(*leaves, backend=backend)
        gen = torch.Generator(device="cpu").manual_seed(grad_out_seed)
        grad = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
        out.backward(grad)
        results[backend] = (out.detach(), [t.grad if t is not None and t.requires_grad else None for t in leaves])
    return results["triton"], results["reference"]


def test_backend_registered():
    info = ops.backend_info()["backends"]["triton"]
    assert info["available"], info["reason"]
    assert info["ops"].pop("group_norm_relu") is None  # no Triton kernel: that op runs the reference
    assert set(info["ops"].values()) == {"interpreter-verified"}
    assert DEVICE in info["devices"]


def _opcheck_cases():
    r = lambda *shape: torch.randn(*shape, device=DEVICE)  # noqa: E731
    grad = lambda t: t.requires_grad_()  # noqa: E731
    uniform = lambda b, n: torch.full((b, n), 1.0 / n, device=DEVICE)  # noqa: E731
    return {
        "correlation_forward": (grad(r(1, 16, 3, 2)), grad(r(1, 16, 2, 3)), torch.rand(1, 2, 3, device=DEVICE), 1e-5),
        "correlation_backward": (r(1, 3, 2, 2, 3), r(1, 3, 2, 2, 3).relu(), r(1, 16, 3, 2), r(1, 16, 2, 3), None,
                                 1e-5),
        "correlation_stack_forward": ([grad(r(1, 16, 3, 2)), grad(r(1, 8, 3, 2))], [grad(r(1, 16, 2, 3)),
                                      grad(r(1, 8, 2, 3))], None, 1e-5),
        "correlation_stack_backward": (r(1, 2, 3, 2, 2, 3), r(1, 2, 3, 2, 2, 3).relu(), [r(1, 16, 3, 2)] * 2,
                                       [r(1, 16, 2, 3)] * 2, None, 1e-5),
        "cp_conv4d_forward": (grad(r(1, 2, 3, 2, 3, 3)), grad(r(2, 2, 3, 3)), grad(r(2)), grad(r(2, 2, 3, 3)), None, 2),
        "cp_conv4d_backward": (r(1, 2, 3, 2, 2, 2), r(1, 2, 3, 2, 3, 3), r(2, 2, 3, 3), r(2, 2, 3, 3), 2,
                               [True, False, True]),
        "sinkhorn_forward": (grad(torch.rand(2, 4, 5, device=DEVICE)), uniform(2, 4), uniform(2, 5), 0.5, 50, 1e-6, 5),
        "sinkhorn_backward": (r(2, 4, 5), torch.rand(2, 4, 5, device=DEVICE) / 20, 0.5),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    """Schemas, fake kernels and autograd registration of the six ops (torch.compile readiness)."""
    op = getattr(torch.ops.tlg, "triton_" + name)
    torch.library.opcheck(op, _opcheck_cases()[name],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif(DEVICE != "cpu", reason="bfloat16 runs on a GPU")
def test_unsupported_dtype_is_a_clear_error():
    x = torch.randn(1, 4, 3, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        ops.correlation(x, x, backend="triton")


# ---------------------------------------------------------------------------------------------
# Correlation
# ---------------------------------------------------------------------------------------------
def _mask(kind, b, h, w):
    if kind is None:
        return None
    if kind == "empty":
        return torch.zeros(b, h, w)
    if kind == "full":
        return torch.ones(b, h, w)
    m = torch.rand(b, h, w)
    return torch.where(m > 0.4, m, torch.zeros_like(m))  # soft values and exact zeros


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", [None, "empty", "full", "partial"])
def test_correlation_matches_reference(dtype, mask):
    b, c = 2, 21
    q = torch.randn(b, c, 5, 7).to(DEVICE, dtype).requires_grad_()
    s = torch.randn(b, c, 13, 3).to(DEVICE, dtype).requires_grad_()
    m = _mask(mask, b, 13, 3)
    m = None if m is None else m.to(DEVICE, dtype)
    (out, (gq, gs, _)), (ref, (rgq, rgs, _)) = _run_both(ops.correlation, [q, s, m])
    assert out.shape == (b, 5, 7, 13, 3) and out.dtype == dtype
    _close(out, ref, dtype)
    _close(gq, rgq, dtype)
    _close(gs, rgs, dtype)
    if mask == "empty":
        assert not out.any() and not gs.any()


def test_correlation_resized_mask_and_zero_features():
    q = torch.randn(1, 16, 3, 4, device=DEVICE)
    q[:, :, 0, 0] = 0  # a zero query vector: zero row, no NaN in the gradient
    q.requires_grad_()
    s = torch.randn(1, 16, 6, 5, device=DEVICE, requires_grad=True)
    m = (torch.rand(1, 11, 9) > 0.5).float().to(DEVICE)  # resized by the front door
    (out, (gq, gs, _)), (ref, (rgq, rgs, _)) = _run_both(ops.correlation, [q, s, m])
    _close(out, ref, torch.float32)
    _close(gq, rgq, torch.float32)
    _close(gs, rgs, torch.float32)


def test_correlation_writes_into_stacked_layout():
    q = [torch.randn(2, 16, 5, 3, device=DEVICE) for _ in range(2)]
    s = [torch.randn(2, 16, 7, 3, device=DEVICE) for _ in range(2)]
    stack = torch.full((2, 2, 5, 3, 7, 3), float("nan"), device=DEVICE)
    for layer in range(2):
        tlgkernels.correlation_forward(q[layer], s[layer], None, 1e-5, out=stack[:, layer])
    expected = torch.stack([reference.correlation(a, b) for a, b in zip(q, s)], dim=1)
    _close(stack, expected, torch.float32)


@pytest.mark.parametrize("grad", [False, True])
def test_multilayer_correlation_front_door(grad):
    """Stacks written straight into (B, L, Hq, Wq, Hs, Ws), with and without autograd."""
    sizes = [(16, 3), (16, 3), (32, 2)]
    q = [torch.randn(2, c, h, h + 1, device=DEVICE) for c, h in sizes]
    s = [torch.randn(2, c, h + 2, h, device=DEVICE) for c, h in sizes]
    mask = (torch.rand(2, 8, 8, device=DEVICE) > 0.3).float()
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(grad) for t in q + s]
        out = ops.multilayer_correlation(leaves[:3], leaves[3:], [1, 3], mask, backend=backend)
        if grad:
            sum((o * torch.linspace(-1, 1, o.numel(), device=DEVICE).reshape(o.shape)).sum() for o in out).backward()
        results[backend] = (out, [t.grad for t in leaves])
    (out, grads), (expected, ref_grads) = results["triton"], results["reference"]
    assert [o.shape for o in out] == [e.shape for e in expected]
    for o, e in zip(out, expected):
        _close(o, e, torch.float32)
    for g, rg in zip(grads, ref_grads):
        assert (g is None) == (not grad)
        if grad:
            _close(g, rg, torch.float32)


# ---------------------------------------------------------------------------------------------
# Center-pivot 4D convolution
# ---------------------------------------------------------------------------------------------
CONV_CASES = [  # (kq, ks, stride, dtype)
    (3, 3, 1, torch.float32),
    (5, 3, 2, torch.float32),
    (3, 5, 4, torch.float32),
    (5, 5, 2, torch.float16),
] + ([(3, 5, 2, torch.bfloat16)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("kq,ks,stride,dtype", CONV_CASES)
def test_cp_conv4d_matches_reference(kq, ks, stride, dtype):
    cin, cout = 3, 5
    x = torch.randn(2, cin, 5, 3, 7, 5).to(DEVICE, dtype).requires_grad_()
    wq = (0.3 * torch.randn(cout, cin, kq, kq)).to(DEVICE, dtype).requires_grad_()
    ws = (0.3 * torch.randn(cout, cin, ks, ks)).to(DEVICE, dtype).requires_grad_()
    bq = torch.randn(cout).to(DEVICE, dtype).requires_grad_()
    bs = torch.randn(cout).to(DEVICE, dtype).requires_grad_()
    fn = lambda x, wq, bq, ws, bs, backend: ops.cp_conv4d(x, wq, bq, ws, bs, stride, backend=backend)  # noqa: E731
    (out, grads), (ref, ref_grads) = _run_both(fn, [x, wq, bq, ws, bs])
    assert out.shape == (2, cout, 5, 3, -(-7 // stride), -(-5 // stride))
    _close(out, ref, dtype, scale=4)
    for g, rg in zip(grads, ref_grads):  # weight/bias gradients sum over many positions
        _close(g, rg, dtype, scale=max(1.0, rg.abs().max().item()))


def test_cp_conv4d_strided_input_no_bias_and_output_mask():
    base = torch.randn(1, 4, 6, 3, 5, 2, device=DEVICE)  # x is a permuted view: read through strides
    x = base.permute(0, 2, 1, 3, 4, 5).requires_grad_()
    assert not x.is_contiguous()
    wq = torch.randn(2, 6, 3, 3, device=DEVICE, requires_grad=True)
    ws = torch.randn(2, 6, 3, 3, device=DEVICE, requires_grad=True)
    fn = lambda x, wq, ws, backend: ops.cp_conv4d(x, wq, None, ws, None, 2, backend=backend)  # noqa: E731
    (out, grads), (ref, ref_grads) = _run_both(fn, [x, wq, ws])
    _close(out, ref, torch.float32)
    for g, rg in zip(grads, ref_grads):
        _close(g, rg, torch.float32, scale=max(1.0, rg.abs().max().item()))

    grad = torch.randn_like(out)
    gx, gwq, gbq, gws, gbs = torch.ops.tlg.triton_cp_conv4d_backward(grad, x.detach(), wq.detach(), ws.detach(), 2,
                                                                     [False, False, True])
    assert gx.numel() == gwq.numel() == gws.numel() == 0
    _close(gbq, grad.sum(dim=(0, 2, 3, 4, 5)), torch.float32)
    _close(gbs, gbq, torch.float32)


# ---------------------------------------------------------------------------------------------
# Sinkhorn
# ---------------------------------------------------------------------------------------------
def _marginals(bsz, n, m, zero_mass):
    """Non-uniform marginals of mass exactly 1 in any dtype: counts of 256 draws, over 256."""
    def draw(size, zeros):
        weights = torch.rand(bsz, size) + 0.2
        for row, col in zeros:
            weights[row, col] = 0.0
        counts = torch.stack([torch.bincount(torch.multinomial(w, 256, replacement=True), minlength=size)
                              for w in weights])
        return counts.double() / 256

    return draw(n, [(0, 2)] if zero_mass else []), draw(m, [(bsz - 1, 0), (bsz - 1, m - 1)] if zero_mass else [])


SINKHORN_CASES = [  # (shape, eps, tol, max_iter, zero_mass, dtype, streamed)
    ((3, 13, 7), 0.5, 1e-6, 200, False, torch.float32, False),
    ((3, 13, 7), 0.05, 1e-4, 300, True, torch.float32, False),
    ((2, 9, 11), 0.01, 1e-4, 120, True, torch.float32, False),  # some problems stop at max_iter
    ((2, 13, 7), 0.1, 1e-4, 200, True, torch.float16, False),
    ((3, 37, 21), 0.1, 1e-5, 200, True, torch.float32, True),  # streamed path on odd tiles
    ((1, 130, 9), 0.5, 1e-6, 100, True, torch.float32, False),  # N > SMALL: streamed without patching
]


@pytest.mark.parametrize("shape,eps,tol,max_iter,zero_mass,dtype,streamed", SINKHORN_CASES)
def test_sinkhorn_matches_reference(monkeypatch, shape, eps, tol, max_iter, zero_mass, dtype, streamed):
    if streamed:
        monkeypatch.setattr(tk_sinkhorn, "SMALL", 16)
    bsz, n, m = shape
    cost = torch.rand(shape)
    cost[0] *= 3.0  # problems converge at different iterations
    a, b = _marginals(bsz, n, m, zero_mass)
    cost, a, b = (t.to(DEVICE, dtype) for t in (cost, a, b))
    kw = dict(eps=eps, max_iter=max_iter, tol=tol, check_every=5)
    out = ops.sinkhorn(cost, a, b, backend="triton", **kw)
    ref = ops.sinkhorn(cost, a, b, backend="reference", **kw)
    assert torch.equal(out.n_iter, ref.n_iter), (out.n_iter, ref.n_iter)
    assert torch.equal(out.converged, ref.converged)
    _close(out.plan, ref.plan, dtype)
    for pot, rpot in ((out.f, ref.f), (out.g, ref.g)):
        assert torch.equal(torch.isinf(pot), torch.isinf(rpot))  # -inf exactly at zero mass
        finite = torch.isfinite(rpot)
        _close(pot[finite], rpot[finite], dtype, scale=10)
    if zero_mass:
        assert not out.plan[0, 2].any() and not out.plan[-1, :, 0].any()


def test_sinkhorn_flags_differ_per_problem():
    cost = torch.rand(3, 10, 12, device=DEVICE)
    cost[1] *= 40.0  # hard problem: hits max_iter unconverged while the others converge
    kw = dict(eps=0.5, max_iter=60, tol=1e-6, check_every=7)
    out = ops.sinkhorn(cost, backend="triton", **kw)
    ref = ops.sinkhorn(cost, backend="reference", **kw)
    assert torch.equal(out.n_iter, ref.n_iter) and torch.equal(out.converged, ref.converged)
    assert out.converged.tolist() == [True, False, True] and out.n_iter[1] == 60


@pytest.mark.parametrize("dtype,streamed", [(torch.float32, False), (torch.float32, True), (torch.float16, False)])
def test_sinkhorn_backward_is_implicit_grad(monkeypatch, dtype, streamed):
    if streamed:
        monkeypatch.setattr(tk_sinkhorn, "SMALL", 8)
    a, b = _marginals(2, 11, 9, zero_mass=True)
    cost = torch.rand(2, 11, 9).to(DEVICE, dtype).requires_grad_()
    a, b = a.to(DEVICE, dtype).requires_grad_(), b.to(DEVICE, dtype).requires_grad_()
    out = ops.sinkhorn(cost, a, b, eps=0.2, tol=1e-5, max_iter=300, backend="triton")
    grad_plan = torch.randn_like(out.plan)
    out.plan.backward(grad_plan)
    expected = reference.sinkhorn_implicit_grad(grad_plan, out.plan.detach(), 0.2)
    for got, exp in zip((cost.grad, a.grad, b.grad), expected):
        _close(got, exp, dtype, scale=10)


def test_sinkhorn_backward_matches_unrolled_at_convergence():
    """At convergence, implicit differentiation equals autograd through the iterations."""
    cost = torch.rand(2, 8, 6, device=DEVICE, dtype=torch.float32)
    grads = {}
    for backend in ("triton", "reference"):
        c = cost.clone().requires_grad_()
        res = ops.sinkhorn(c, eps=0.5, tol=1e-7, max_iter=2000, check_every=1, backend=backend)
        (res.plan * torch.linspace(-1, 1, 48, device=DEVICE).reshape(8, 6)).sum().backward()
        grads[backend] = c.grad
    torch.testing.assert_close(grads["triton"], grads["reference"], atol=2e-5, rtol=1e-3)
