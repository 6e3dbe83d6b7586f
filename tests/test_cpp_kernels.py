"""The C++/OpenMP CPU kernels (backend="cpp") against the reference, through the tlg.ops front doors."""
from __future__ import annotations

import pytest
import torch

import tlg.ops as ops
from tlg.ops import _native
from tlg.ops import reference as R

pytestmark = pytest.mark.skipif(_native.load_error() is not None, reason=str(_native.load_error()))

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous storage (a transposed copy transposed back)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _fwd_bwd(fn, inputs, backend):
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*xs, backend=backend)
    out = out.plan if isinstance(out, R.SinkhornResult) else out
    g = torch.randn_like(out)
    out.backward(g)
    return out, [x.grad for x in xs], g


# ------------------------------------------------------------------------------ correlation
def _mask(kind, b, h, w, dtype):
    if kind is None:
        return None
    if kind == "empty":
        return torch.zeros(b, h, w, dtype=dtype)
    if kind == "full":
        return torch.ones(b, h, w, dtype=dtype)
    if kind == "box":  # runs of kept columns that start and end rows (the output is written run by run)
        m = torch.zeros(b, h, w, dtype=dtype)
        m[:, 1:4, : w // 2] = 1
        m[:, h - 1, w // 3:] = 0.5
        return m
    m = (torch.rand(b, h, w) > 0.6).to(dtype) * torch.rand(b, h, w, dtype=dtype)  # soft values, many zeros
    m[0] = 0  # one batch element with an empty support
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", [None, "empty", "full", "partial", "box", "resized"])
def test_correlation_matches_reference(dtype, mask):
    b, c, hq, wq, hs, ws = 2, 5, 13, 7, 6, 25
    q = _noncontig(torch.randn(b, c, hq, wq, dtype=dtype))
    q[1, :, 2, 3] = 0  # a zero-norm query position: products exactly 0, the ReLU gate open as clamp's
    s = torch.randn(b, c, hs, ws, dtype=dtype)
    s[:, :, 0, 0] = 0  # a zero-norm support position
    m = _mask("partial", b, 9, 11, dtype) if mask == "resized" else _mask(mask, b, hs, ws, dtype)

    def fn(q, s, backend):
        return ops.correlation(q, s, m, backend=backend)

    out, grads, g = _fwd_bwd(fn, [q, s], "cpp")
    ref, ref_grads, _ = _fwd_bwd_with(fn, [q, s], g)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, **TOL[dtype])


def _fwd_bwd_with(fn, inputs, g, backend="reference"):
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*xs, backend=backend)
    out.backward(g)
    return out, [x.grad for x in xs], g


@pytest.mark.parametrize("masked", [False, True])
def test_multilayer_correlation_stack(masked):
    b = 2
    layers = [(3, 13, 7), (4, 13, 7), (6, 7, 5), (5, 7, 5), (8, 4, 3)]
    qs = [torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True) for c, h, w in layers]
    ss = [torch.randn(b, c, h + 1, w, dtype=torch.float64, requires_grad=True) for c, h, w in layers]
    m = _mask("partial", b, 14, 8, torch.float64) if masked else None
    outs = ops.multilayer_correlation(qs, ss, [1, 3, 5], m, backend="cpp")
    refs = R.multilayer_correlation(qs, ss, [1, 3, 5], m)
    assert [o.shape for o in outs] == [r.shape for r in refs]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, **TOL[torch.float64])
    gs = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, qs + ss, gs)
    want = torch.autograd.grad(refs, qs + ss, gs)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, **TOL[torch.float64])


# ------------------------------------------------------------------------------ center-pivot conv
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kq,ks,stride,sizes", [
    (3, 3, 1, (5, 6, 2, 2)),     # HSNet mixing (2x2 grid): the support part by 3-multiply Toeplitz products
    (3, 5, 2, (7, 5, 13, 9)),
    (5, 3, 4, (6, 7, 13, 13)),
    (5, 5, 4, (4, 5, 25, 11)),   # large support grids take the dense path (one GEMM over all p)
    (3, 3, 1, (5, 4, 9, 8)),
    (3, 3, 2, (3, 3, 1, 3)),
    (3, 3, 2, (4, 3, 3, 3)),     # small grid with stride, 44% of the support taps valid: per position
    (3, 3, 1, (4, 3, 2, 3)),     # small grid: one support GEMM over (o, p) x (c, s), zeros in it
    (3, 5, 1, (3, 3, 2, 30)),    # wide, flat grid: per-position support GEMMs
    (3, 5, 1, (4, 5, 1, 1)),     # 1x1 support grid: Ws's center folded into Wq's
    (5, 3, 2, (5, 3, 1, 1)),
])
def test_cp_conv4d_matches_reference(dtype, kq, ks, stride, sizes):
    b, cin, cout = 2, 3, 4
    x = _noncontig(torch.randn(b, cin, *sizes, dtype=dtype))
    wq, ws = torch.randn(cout, cin, kq, kq, dtype=dtype), torch.randn(cout, cin, ks, ks, dtype=dtype)
    bq, bs = torch.randn(cout, dtype=dtype), torch.randn(cout, dtype=dtype)

    def fn(x, wq, bq, ws, bs, backend):
        return ops.cp_conv4d(x, wq, bq, ws, bs, stride, backend=backend)

    out, grads, g = _fwd_bwd(fn, [x, wq, bq, ws, bs], "cpp")
    ref, ref_grads, _ = _fwd_bwd_with(fn, [x, wq, bq, ws, bs], g)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("cin,cout", [(3, 16), (16, 8)])
@pytest.mark.parametrize("kq,ks,stride,sizes", [(5, 5, 4, (6, 7, 13, 11)), (3, 3, 2, (5, 4, 7, 7))])
def test_cp_conv4d_sixteen_channels(cin, cout, kq, ks, stride, sizes):
    """In float32, Cout = 16 takes the register-blocked kernel (where AVX-512 is available) for the main
    GEMM, Cin = 16 for the query part of grad_x; column counts are not multiples of 16."""
    _check_float32_against_float64(cin, cout, kq, ks, stride, sizes, seed=1)


def _check_float32_against_float64(cin, cout, kq, ks, stride, sizes, seed):
    """cp_conv4d's float32 output and gradients (backend cpp) against the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, *sizes, generator=g)
    wq, ws = torch.randn(cout, cin, kq, kq, generator=g), torch.randn(cout, cin, ks, ks, generator=g)
    bq, bs = torch.randn(cout, generator=g), torch.randn(cout, generator=g)

    def fn(x, wq, bq, ws, bs, backend):
        return ops.cp_conv4d(x, wq, bq, ws, bs, stride, backend=backend)

    out, grads, gy = _fwd_bwd(fn, [x, wq, bq, ws, bs], "cpp")
    ref, ref_grads, _ = _fwd_bwd_with(fn, [t.double() for t in (x, wq, bq, ws, bs)], gy.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r.float(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cin,cout,stride,sizes", [  # batch 2 x tiles x Sp GEMM columns >= 256 (backward 128)
    (16, 32, 1, (5, 7, 3, 4)),   # odd query sizes: partial 2x2 tiles at the right and bottom edges
    (16, 32, 2, (7, 9, 4, 4)),   # 160 columns: the forward by im2col GEMM, the gradients by Winograd
    (16, 32, 2, (12, 12, 4, 4)),  # pruned support (HSNet's 64->128 layers)
    (17, 33, 2, (7, 9, 5, 5)),
    (32, 32, 1, (11, 13, 2, 2)),  # mixing block shape
    (16, 33, 1, (9, 9, 2, 3)),   # small unpruned grid: the merged support GEMM has zeros in it
    (17, 32, 1, (23, 24, 1, 1)),  # 1x1 support grid: Ws's center folded into Wq's
    (16, 32, 1, (1, 1, 12, 12)),  # a 1x1 query grid: one tile, three of its four outputs cut off
])
def test_cp_conv4d_winograd_query_path(dtype, cin, cout, stride, sizes):
    """3x3 query kernels with >= 16 in and >= 32 out channels and >= 256 GEMM columns (128 in the backward)
    take the Winograd F(2x2, 3x3) path for the query part of the forward and both gradients; every output and gradient
    matches the direct reference."""
    g = torch.Generator().manual_seed(2)
    x = _noncontig(torch.randn(2, cin, *sizes, generator=g, dtype=dtype))
    wq, ws = (torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype) for _ in range(2))
    bq, bs = (torch.randn(cout, generator=g, dtype=dtype) for _ in range(2))

    def fn(x, wq, bq, ws, bs, backend):
        return ops.cp_conv4d(x, wq, bq, ws, bs, stride, backend=backend)

    out, grads, gy = _fwd_bwd(fn, [x, wq, bq, ws, bs], "cpp")
    ref, ref_grads, _ = _fwd_bwd_with(fn, [x, wq, bq, ws, bs], gy)
    scale = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out, ref, **scale)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, **scale)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def cpu_threads(request):
    """The float32 GEMMs inside the kernels' parallel tasks run on oneDNN's micro-kernel (csrc/cpu/common.h)
    when the region has several threads, on MKL with one: each test using this runs under both."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("cin,cout,kq,ks,stride,sizes", [
    (16, 32, 3, 3, 2, (7, 7, 4, 4)),     # dense support taps (small query grid)
    (8, 24, 5, 5, 4, (9, 8, 13, 13)),    # per-position support GEMMs, im2col query part
    (16, 32, 3, 3, 1, (12, 12, 2, 2)),   # 2x2 support grid (AVX-512 Toeplitz transforms), Winograd query part
    (16, 32, 3, 3, 2, (12, 12, 7, 7)),   # per-position with Winograd
    # Winograd on 2x2 (kept) support grids, odd query sizes: the AVX-512 transforms for 4 support
    # positions (csrc/cpu/winograd.h) with partial tiles at the last row and column
    (16, 32, 3, 3, 1, (17, 15, 2, 2)),
    (16, 32, 3, 3, 2, (15, 17, 4, 3)),
])
def test_cp_conv4d_float32_gemm_engines(cpu_threads, cin, cout, kq, ks, stride, sizes):
    _check_float32_against_float64(cin, cout, kq, ks, stride, sizes, seed=3)


def test_correlation_float32_gemm_engines(cpu_threads):
    q, s = torch.randn(2, 40, 9, 11), torch.randn(2, 40, 13, 7)
    m = _mask("box", 2, 13, 7, torch.float32)
    for mask in (None, m):
        out = ops.correlation(q, s, mask, backend="cpp")
        ref = R.correlation(q.double(), s.double(), None if mask is None else mask.double())
        torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-5)


def test_cp_conv4d_partial_grads_and_no_bias():
    x = torch.randn(1, 2, 4, 4, 5, 5, dtype=torch.float64)
    wq = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = ops.cp_conv4d(x, wq, None, ws, None, 2, backend="cpp")
    torch.testing.assert_close(out, R.cp_conv4d(x, wq, None, ws, None, 2))
    gq, gs = torch.autograd.grad(out.sum(), [wq, ws])
    rq, rs = torch.autograd.grad(R.cp_conv4d(x, wq, None, ws, None, 2).sum(), [wq, ws])
    torch.testing.assert_close(gq, rq)
    torch.testing.assert_close(gs, rs)
    # output_mask honoured: gradients not asked for come back empty
    g = torch.ones_like(out)
    gx, gwq, gbq, gws, gbs = torch.ops.tlg.cp_conv4d_backward(g, x, wq.detach(), ws.detach(), 2, [True, False, False])
    assert gx.shape == x.shape and gwq.numel() == gbq.numel() == gws.numel() == gbs.numel() == 0


# ------------------------------------------------------------------------------ GroupNorm + ReLU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,groups", [
    ((2, 8, 5, 7, 3, 3), 4),    # HSNet's 6-D encoder activations, odd sizes
    ((1, 16, 13, 13, 4, 4), 4),
    ((3, 6, 11), 3),
    ((2, 4, 1), 1),             # one value per channel: a group of 4
])
def test_group_norm_relu_matches_reference(dtype, shape, groups):
    g = torch.Generator().manual_seed(3)
    x = _noncontig(torch.randn(*shape, generator=g, dtype=dtype) * 3 + 5)  # a mean far from 0
    w = torch.randn(shape[1], generator=g, dtype=dtype)
    w[0] = 0  # a zero scale: that channel's output is relu(beta), its gate closed or open everywhere
    b = torch.randn(shape[1], generator=g, dtype=dtype)

    def fn(x, w, b, backend):
        return ops.group_norm_relu(x, groups, w, b, backend=backend)

    out, grads, gy = _fwd_bwd(fn, [x, w, b], "cpp")
    ref, ref_grads, _ = _fwd_bwd_with(fn, [x, w, b], gy)
    assert 0 < (out > 0).float().mean() < 1  # both sides of the ReLU are exercised
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, **tol)


def test_group_norm_relu_module_and_errors():
    """The module keeps nn.GroupNorm's state-dict keys; without weight and bias the op is the plain
    normalisation; a backend without the kernel runs the reference; bad input gets a clear error."""
    m = ops.GroupNormReLU(2, 6, backend="cpp")
    assert set(m.state_dict()) == set(torch.nn.GroupNorm(2, 6).state_dict())
    x = torch.randn(2, 6, 4, 5)
    torch.testing.assert_close(m(x), torch.relu(torch.nn.functional.group_norm(x, 2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ops.group_norm_relu(x, 3, backend="cpp"), R.group_norm_relu(x, 3, None, None),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of groups"):
        ops.group_norm_relu(x, 4)
    with pytest.raises(ValueError, match="weight has 5 entries"):
        ops.group_norm_relu(x, 3, torch.ones(5))
    with pytest.raises(ValueError, match="at least 2-D"):
        ops.group_norm_relu(torch.randn(6), 3)
    with pytest.raises(TypeError, match="floating"):
        ops.group_norm_relu(torch.ones(2, 6, dtype=torch.int64), 3)


# ------------------------------------------------------------------------------ Sinkhorn
def _marginals(bsz, n, m, dtype, zero_mass):
    a = torch.rand(bsz, n, dtype=dtype) + 0.2
    b = torch.rand(bsz, m, dtype=dtype) + 0.2
    if zero_mass:
        a[0, 1] = 0
        b[0, 2] = 0
        b[1, 0] = 0
    return a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.01])
@pytest.mark.parametrize("zero_mass", [False, True])
def test_sinkhorn_forward_matches_reference(dtype, eps, zero_mass):
    bsz, n, m = 3, 13, 25
    cost = torch.rand(bsz, n, m, dtype=dtype)
    a, b = _marginals(bsz, n, m, dtype, zero_mass)
    kw = dict(eps=eps, max_iter=400, tol=1e-5 if dtype == torch.float32 else 1e-9, check_every=7)
    got = ops.sinkhorn(cost, a, b, backend="cpp", **kw)
    ref = ops.sinkhorn(cost, a, b, backend="reference", **kw)
    assert not got.plan.isnan().any() and not got.f.isnan().any() and not got.g.isnan().any()
    atol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.plan, ref.plan, rtol=0, atol=atol)
    if zero_mass:
        assert (got.plan[0, 1] == 0).all() and (got.plan[0, :, 2] == 0).all()
        assert got.f[0, 1] == -float("inf") and got.g[0, 2] == -float("inf")
    if dtype == torch.float64:  # same iterates: same iteration counts and flags
        assert torch.equal(got.n_iter, ref.n_iter) and torch.equal(got.converged, ref.converged)
        fin = got.f.isfinite()
        torch.testing.assert_close(got.f[fin], ref.f[fin], rtol=1e-8, atol=1e-10)


def test_sinkhorn_per_problem_convergence():
    cost = torch.rand(3, 8, 9, dtype=torch.float64)
    cost[1] *= 40  # slow problem: hits max_iter
    got = ops.sinkhorn(cost, eps=0.05, max_iter=30, tol=1e-12, check_every=4, backend="cpp")
    ref = ops.sinkhorn(cost, eps=0.05, max_iter=30, tol=1e-12, check_every=4, backend="reference")
    assert torch.equal(got.n_iter, ref.n_iter) and torch.equal(got.converged, ref.converged)
    torch.testing.assert_close(got.plan, ref.plan)


@pytest.mark.parametrize("zero_mass", [False, True])
def test_sinkhorn_backward(zero_mass):
    bsz, n, m, eps = 2, 6, 7, 0.5
    cost = torch.rand(bsz, n, m, dtype=torch.float64)
    a, b = _marginals(bsz, n, m, torch.float64, zero_mass)
    kw = dict(eps=eps, max_iter=2000, tol=1e-13, check_every=1)
    ins = [t.clone().requires_grad_(True) for t in (cost, a, b)]
    res = ops.sinkhorn(*ins, backend="cpp", **kw)
    assert res.converged.all()
    g = torch.randn_like(res.plan)
    got = torch.autograd.grad(res.plan, ins, g)
    # the implicit-gradient formula of the spec
    want = R.sinkhorn_implicit_grad(g, res.plan.detach(), eps)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)
    # the reference's unrolled iterations (converged): same cost gradient; the marginal gradients
    # agree up to the gauge (a constant shift between grad_a and grad_b)
    ref_ins = [t.clone().requires_grad_(True) for t in (cost, a, b)]
    ref = ops.sinkhorn(*ref_ins, backend="reference", **kw)
    want = torch.autograd.grad(ref.plan, ref_ins, g)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
    if not zero_mass:
        for x, y in zip(got[1:], want[1:]):
            d = x - y
            torch.testing.assert_close(d - d.mean(1, keepdim=True), torch.zeros_like(d), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ bfloat16
def test_bfloat16_forward():
    bf = torch.bfloat16
    q, s = torch.randn(2, 8, 7, 5), torch.randn(2, 8, 6, 6)
    m = (torch.rand(2, 6, 6) > 0.5).float()
    out = ops.correlation(q.to(bf), s.to(bf), m.to(bf), backend="cpp")
    assert out.dtype == bf
    torch.testing.assert_close(out.float(), R.correlation(q.to(bf).float(), s.to(bf).float(), m), rtol=2e-2, atol=2e-2)
    x = torch.randn(1, 3, 5, 5, 6, 6)
    wq, ws, bq = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 5, 5), torch.randn(4)
    out = ops.cp_conv4d(x.to(bf), wq.to(bf), bq.to(bf), ws.to(bf), None, 2, backend="cpp")
    ref = R.cp_conv4d(*(t.to(bf).float() for t in (x, wq, bq, ws)), None, 2)
    assert out.dtype == bf
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=1e-1)
    x, w, b = torch.randn(2, 8, 5, 5, 3, 3), torch.randn(8), torch.randn(8)
    out = ops.group_norm_relu(x.to(bf), 4, w.to(bf), b.to(bf), backend="cpp")
    assert out.dtype == bf
    ref = R.group_norm_relu(x.to(bf).float(), 4, w.to(bf).float(), b.to(bf).float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    cost = torch.rand(2, 9, 11)
    got = ops.sinkhorn(cost.to(bf), eps=0.1, tol=1e-5, backend="cpp")
    ref = R.sinkhorn(cost.to(bf).float(), eps=0.1, tol=1e-5)
    assert got.plan.dtype == bf
    torch.testing.assert_close(got.plan.float(), ref.plan, rtol=2e-2, atol=1e-3)


# ------------------------------------------------------------------------------ gradcheck
def test_gradcheck_tiny():
    d = torch.float64
    q = torch.randn(1, 3, 2, 3, dtype=d, requires_grad=True)
    s = torch.randn(1, 3, 3, 2, dtype=d, requires_grad=True)
    m = torch.tensor([[[1.0, 0.5], [0.0, 1.0], [0.3, 0.0]]], dtype=d)
    assert torch.autograd.gradcheck(lambda q, s: ops.correlation(q, s, m, backend="cpp"), (q, s))
    assert torch.autograd.gradcheck(
        lambda q, s: ops.multilayer_correlation([q, q * 2], [s, s + 1], [1, 2], backend="cpp")[1], (q, s))
    x = torch.randn(1, 2, 3, 3, 4, 3, dtype=d, requires_grad=True)
    wq = torch.randn(2, 2, 3, 3, dtype=d, requires_grad=True)
    ws = torch.randn(2, 2, 3, 3, dtype=d, requires_grad=True)
    bq, bs = (torch.randn(2, dtype=d, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *t: ops.cp_conv4d(*t, 2, backend="cpp"), (x, wq, bq, ws, bs))
    x = torch.randn(1, 2, 3, 2, 5, 5, dtype=d, requires_grad=True)  # dense path
    assert torch.autograd.gradcheck(lambda *t: ops.cp_conv4d(*t, 1, backend="cpp"), (x, wq, bq, ws, bs))
    x = torch.randn(1, 2, 3, 2, 2, 2, dtype=d, requires_grad=True)  # 2x2 grid: 3-multiply Toeplitz products
    assert torch.autograd.gradcheck(lambda *t: ops.cp_conv4d(*t, 1, backend="cpp"), (x, wq, bq, ws, bs))
    x = torch.randn(2, 4, 3, 2, 2, 2, dtype=d, requires_grad=True)
    gw, gb = torch.randn(4, dtype=d, requires_grad=True), torch.randn(4, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.group_norm_relu(*t[:1], 2, *t[1:], backend="cpp"), (x, gw, gb))
    cost = torch.rand(1, 3, 4, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c: ops.sinkhorn(c, eps=0.5, max_iter=5000, tol=1e-14, check_every=1, backend="cpp").plan, (cost,),
        atol=1e-6)


# ------------------------------------------------------------------------------ torch.compile
def test_torch_compile_fullgraph():
    x = torch.randn(1, 2, 4, 4, 3, 3, requires_grad=True)
    wq, ws = torch.randn(3, 2, 3, 3, requires_grad=True), torch.randn(3, 2, 3, 3, requires_grad=True)
    q, s = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 3, 3)

    def f(x, wq, ws, q, s):
        y = ops.cp_conv4d(x, wq, None, ws, None, 1, backend="cpp")
        y = ops.group_norm_relu(y, 3, backend="cpp")
        c = ops.correlation(q, s, backend="cpp")
        st = ops.multilayer_correlation([q, q], [s, s], [1, 2], backend="cpp")
        return y.mean(1) * c + st[1].sum(1)

    eager = f(x, wq, ws, q, s)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, wq, ws, q, s)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert x.grad is not None and wq.grad is not None
