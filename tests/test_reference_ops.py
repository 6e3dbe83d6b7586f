"""The reference ops against independent definitions (explicit loops, a dense 4D conv, POT)."""
import itertools
import math

import numpy as np
import pytest
import torch

from tlg.ops import reference as R

D = torch.float64


# ------------------------------------------------------------------------------ correlation
def _corr_loops(q, s, mask=None, eps=1e-5):
    b, c, hq, wq = q.shape
    hs, ws = s.shape[-2:]
    out = torch.zeros(b, hq, wq, hs, ws, dtype=q.dtype)
    for n, i, j in itertools.product(range(b), range(hq), range(wq)):
        qv = q[n, :, i, j]
        qv = qv / (qv.norm() + eps)
        for k, l in itertools.product(range(hs), range(ws)):
            sv = s[n, :, k, l] * (1.0 if mask is None else mask[n, k, l])
            sv = sv / (sv.norm() + eps)
            out[n, i, j, k, l] = max(0.0, float(qv @ sv))
    return out


@pytest.mark.parametrize("with_mask", [False, True])
def test_correlation_equals_explicit_loops(with_mask):
    q, s = torch.randn(2, 6, 3, 4, dtype=D), torch.randn(2, 6, 5, 3, dtype=D)
    mask = (torch.rand(2, 5, 3, dtype=D) > 0.4).to(D) if with_mask else None
    torch.testing.assert_close(R.correlation(q, s, mask), _corr_loops(q, s, mask))


def test_masked_support_columns_are_zero():
    q, s = torch.randn(1, 4, 3, 3, dtype=D), torch.randn(1, 4, 4, 4, dtype=D)
    mask = torch.ones(1, 4, 4, dtype=D)
    mask[0, 1:3, 2:] = 0
    corr = R.correlation(q, s, mask)
    assert torch.all(corr[0, :, :, 1:3, 2:] == 0)
    assert corr[0, :, :, 0, 0].abs().sum() > 0  # unmasked columns still correlate
    assert torch.all(R.correlation(q, s, torch.zeros(1, 4, 4, dtype=D)) == 0)


def test_mask_of_other_size_is_resized_bilinearly():
    q, s = torch.randn(1, 4, 3, 3, dtype=D), torch.randn(1, 4, 4, 4, dtype=D)
    big = (torch.rand(1, 9, 9, dtype=D) > 0.5).to(D)
    small = torch.nn.functional.interpolate(big[:, None], size=(4, 4), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(R.correlation(q, s, big), _corr_loops(q, s, small))


def test_multilayer_correlation_groups_like_hsnet():
    sizes = [6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 2, 2, 2]  # 4 x layer2, 6 x layer3, 3 x layer4
    qf = [torch.randn(1, 3, h, h, dtype=D) for h in sizes]
    sf = [torch.randn(1, 3, h, h, dtype=D) for h in sizes]
    l4, l3, l2 = R.multilayer_correlation(qf, sf, [3, 9, 13])
    assert l4.shape == (1, 3, 2, 2, 2, 2) and l3.shape == (1, 6, 4, 4, 4, 4) and l2.shape == (1, 4, 6, 6, 6, 6)
    torch.testing.assert_close(l3[:, 0], R.correlation(qf[4], sf[4]))
    torch.testing.assert_close(l2[:, 3], R.correlation(qf[3], sf[3]))
    torch.testing.assert_close(l4[:, 2], R.correlation(qf[12], sf[12]))


# ------------------------------------------------------------------------------ cp_conv4d
def _dense_center_pivot(x, wq, bq, ws, bs, stride):
    """Brute force: a dense k x k x k x k 4D convolution whose kernel is zero off the two
    center-pivot planes, evaluated everywhere (stride 1), then strided over the support dims."""
    b, cin, ha, wa, hb, wb = x.shape
    cout, kq, ks = wq.shape[0], wq.shape[-1], ws.shape[-1]
    k = max(kq, ks)
    c = k // 2
    kern = torch.zeros(cout, cin, k, k, k, k, dtype=x.dtype)
    oq, os_ = c - kq // 2, c - ks // 2
    kern[:, :, oq:oq + kq, oq:oq + kq, c, c] += wq
    kern[:, :, c, c, os_:os_ + ks, os_:os_ + ks] += ws
    xp = torch.nn.functional.pad(x, (c, c, c, c, c, c, c, c))
    y = torch.zeros(b, cout, ha, wa, hb, wb, dtype=x.dtype)
    for di, dj, dk, dl in itertools.product(range(k), repeat=4):
        w = kern[:, :, di, dj, dk, dl]
        if not torch.any(w):
            continue
        patch = xp[:, :, di:di + ha, dj:dj + wa, dk:dk + hb, dl:dl + wb]
        y += torch.einsum("oc,bcijkl->boijkl", w, patch)
    y += (bq + bs).view(1, cout, 1, 1, 1, 1)
    return y[..., ::stride, ::stride]


@pytest.mark.parametrize("kq,ks", [(3, 3), (5, 5), (5, 3), (3, 5)])
@pytest.mark.parametrize("stride", [1, 2, 4])
def test_cp_conv4d_equals_dense_4d_conv(kq, ks, stride):
    x = torch.randn(2, 2, 5, 4, 13, 7, dtype=D)
    wq, ws = torch.randn(3, 2, kq, kq, dtype=D), torch.randn(3, 2, ks, ks, dtype=D)
    bq, bs = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    y = R.cp_conv4d(x, wq, bq, ws, bs, stride)
    assert y.shape == (2, 3, 5, 4, math.ceil(13 / stride), math.ceil(7 / stride))
    torch.testing.assert_close(y, _dense_center_pivot(x, wq, bq, ws, bs, stride))


def test_cp_conv4d_odd_25_support():
    x = torch.randn(1, 1, 3, 3, 25, 25, dtype=D)
    wq, ws = torch.randn(2, 1, 3, 3, dtype=D), torch.randn(2, 1, 5, 5, dtype=D)
    bq, bs = torch.randn(2, dtype=D), torch.randn(2, dtype=D)
    for stride in (1, 2, 4):
        torch.testing.assert_close(R.cp_conv4d(x, wq, bq, ws, bs, stride), _dense_center_pivot(x, wq, bq, ws, bs, stride))


# ------------------------------------------------------------------------------ sinkhorn
ot = pytest.importorskip("ot")


def _problem(bsz, n, m, zero_rows=(), zero_cols=(), uniform=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(bsz, n, m, generator=g, dtype=D)
    if uniform:
        return cost, torch.full((bsz, n), 1 / n, dtype=D), torch.full((bsz, m), 1 / m, dtype=D)
    a = torch.rand(bsz, n, generator=g, dtype=D) + 0.1
    b = torch.rand(bsz, m, generator=g, dtype=D) + 0.1
    for i in zero_rows:
        a[:, i] = 0
    for j in zero_cols:
        b[:, j] = 0
    return cost, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


@pytest.mark.parametrize("eps", [1.0, 0.1, 0.05, 0.01])
@pytest.mark.parametrize("uniform", [True, False])
def test_sinkhorn_matches_pot(eps, uniform):
    cost, a, b = _problem(3, 7, 5, uniform=uniform)
    res = R.sinkhorn(cost, a, b, eps=eps, max_iter=20000, tol=1e-10)
    assert res.converged.all()
    for i in range(3):
        p_log = ot.bregman.sinkhorn_log(a[i].numpy(), b[i].numpy(), cost[i].numpy(), eps, numItermax=20000, stopThr=1e-12)
        np.testing.assert_allclose(res.plan[i].numpy(), p_log, atol=1e-8, rtol=1e-6)
        if eps >= 0.05:  # POT's plain (non-log) solver underflows below that
            p = ot.sinkhorn(a[i].numpy(), b[i].numpy(), cost[i].numpy(), eps, numItermax=20000, stopThr=1e-12)
            np.testing.assert_allclose(res.plan[i].numpy(), p, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(res.plan.sum(2), a, atol=1e-9, rtol=0)
    torch.testing.assert_close(res.plan.sum(1), b, atol=1e-9, rtol=0)


def test_sinkhorn_zero_mass_entries_give_zero_plan_and_no_nan():
    cost, a, b = _problem(2, 6, 5, zero_rows=(1, 4), zero_cols=(2,))
    cost.requires_grad_(True)
    res = R.sinkhorn(cost, a, b, eps=0.05, max_iter=5000, tol=1e-10)
    assert not torch.isnan(res.plan).any()
    assert torch.all(res.plan[:, [1, 4], :] == 0) and torch.all(res.plan[:, :, 2] == 0)
    assert torch.isneginf(res.f[:, 1]).all() and torch.isneginf(res.g[:, 2]).all()
    (res.plan * torch.randn_like(res.plan)).sum().backward()
    assert torch.isfinite(cost.grad).all()
    for i in range(2):
        p_log = ot.bregman.sinkhorn_log(a[i].numpy(), b[i].numpy(), cost[i].detach().numpy(), 0.05,
                                        numItermax=5000, stopThr=1e-12)
        np.testing.assert_allclose(res.plan[i].detach().numpy(), p_log, atol=1e-8)


def test_sinkhorn_per_problem_convergence_and_counts():
    easy, _, _ = _problem(1, 5, 5, uniform=True, seed=1)
    hard = torch.rand(1, 5, 5, dtype=D)  # needs several checks at this eps
    cost = torch.cat([easy * 0, hard])
    res = R.sinkhorn(cost, eps=0.05, max_iter=2000, tol=1e-8, check_every=7)
    assert res.converged.tolist() == [True, True]
    assert res.n_iter[0] == 7  # a zero cost is solved at the first check
    assert res.n_iter[1] > res.n_iter[0] and res.n_iter[1] % 7 == 0
    # a frozen problem keeps its potentials: rerunning it alone gives the same plan
    alone = R.sinkhorn(cost[:1], eps=0.05, max_iter=2000, tol=1e-8, check_every=7)
    torch.testing.assert_close(alone.plan, res.plan[:1])


def test_sinkhorn_reports_non_convergence():
    cost = torch.rand(2, 6, 6, dtype=D) * 10
    res = R.sinkhorn(cost, eps=0.01, max_iter=3, tol=1e-12)
    assert not res.converged.any() and res.n_iter.tolist() == [3, 3]


def test_sinkhorn_implicit_grad_equals_unrolled_at_convergence():
    cost, a, b = _problem(2, 6, 4, zero_rows=(2,))
    cost.requires_grad_(True)
    res = R.sinkhorn(cost, a, b, eps=0.1, max_iter=20000, tol=1e-12)
    w = torch.randn_like(res.plan)
    (res.plan * w).sum().backward()
    grad_cost, _, _ = R.sinkhorn_implicit_grad(w, res.plan.detach(), 0.1)
    torch.testing.assert_close(grad_cost, cost.grad, atol=1e-8, rtol=1e-6)


def test_half_inputs_are_computed_in_float32():
    q, s = torch.randn(1, 8, 3, 3), torch.randn(1, 8, 3, 3)
    out = R.correlation(q.bfloat16(), s.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), R.correlation(q.bfloat16().float(), s.bfloat16().float()), atol=1e-2, rtol=1e-2)
