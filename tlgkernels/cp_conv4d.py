r"""Center-pivot 4D convolution, forward and backward, on the 6-D tensor as it is (no permutes).

.. math::
    y[b,o,a_1,a_2,p_1,p_2] = \beta_o + \sum_{t}\sum_c W[o,c,t]\,
        x[b,c,a_1+\delta^{a}_{1}(t),\,a_2+\delta^{a}_{2}(t),\,s p_1+\delta^{b}_{1}(t),\,s p_2+\delta^{b}_{2}(t)]

with one tap list for both convolutions: the k_q^2 query taps move over (Ha, Wa) at the pruned
support positions (s p_1, s p_2); the k_s^2 support taps move over (Hb, Wb) around them.
:math:`W` is the two weights side by side, :math:`\beta = b_q + b_s`, out-of-range taps read zero
(padding k//2). Each kernel is an implicit GEMM: forward rows are output positions, reduced over
(tap, Cin); grad_x rows are input positions, reduced over (tap, Cout), with the taps that do not
land on a stride multiple masked out; grad_W reduces over (batch, output positions) per tap,
split over the positions (split-K, partial sums added by the wrapper);
grad_b_q = grad_b_s = sum of grad_y over everything but Cout.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import CONV_GPU, INTERPRET, fp32_dot_precision, gemm_configs, supported_dtype

SPLIT_CHUNK = 128 if INTERPRET else 4096  # output positions per split of the weight-gradient reduction


@triton.jit
def _tap(t, KQ: tl.constexpr, KS: tl.constexpr):
    """Offsets (da1, da2, db1, db2) of tap t: query taps first, then support taps."""
    is_q = t < KQ * KQ
    ts = t - KQ * KQ
    da1 = tl.where(is_q, t // KQ - KQ // 2, 0)
    da2 = tl.where(is_q, t % KQ - KQ // 2, 0)
    db1 = tl.where(is_q, 0, ts // KS - KS // 2)
    db2 = tl.where(is_q, 0, ts % KS - KS // 2)
    return da1, da2, db1, db2


@triton.jit
def _out_coords(offs, WA, HP, WP):
    """Flat output position -> (a1, a2, p1, p2)."""
    p2 = offs % WP
    p1 = (offs // WP) % HP
    a2 = (offs // (WP * HP)) % WA
    a1 = offs // (WP * HP * WA)
    return a1, a2, p1, p2


@triton.jit
def _x_offsets(a1, a2, p1, p2, t, valid, HA, WA, HB, WB, sxa1, sxa2, sxb1, sxb2,
               S: tl.constexpr, KQ: tl.constexpr, KS: tl.constexpr):
    """Offsets into x (without batch/channel) read by tap t at output positions, and their validity."""
    da1, da2, db1, db2 = _tap(t, KQ, KS)
    h1, h2, w1, w2 = a1 + da1, a2 + da2, p1 * S + db1, p2 * S + db2
    ok = valid & (h1 >= 0) & (h1 < HA) & (h2 >= 0) & (h2 < WA) & (w1 >= 0) & (w1 < HB) & (w2 >= 0) & (w2 < WB)
    return h1 * sxa1 + h2 * sxa2 + w1 * sxb1 + w2 * sxb2, ok


@triton.autotune(configs=gemm_configs(1024, 16, 16, gpu=CONV_GPU),
                 key=["CIN", "COUT", "MOUT", "S", "KQ", "KS"])
@triton.jit
def _forward_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, CIN, COUT, HA, WA, HB, WB, HP, WP, MOUT,
                    sxb, sxc, sxa1, sxa2, sxb1, sxb2, swo, swc,
                    HAS_BIAS: tl.constexpr, S: tl.constexpr, KQ: tl.constexpr, KS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # 64-bit: 6-D tensors outgrow int32
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, omask = offs_m < MOUT, offs_o < COUT
    a1, a2, p1, p2 = _out_coords(offs_m, WA, HP, WP)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, KQ * KQ + KS * KS):
        xoff, ok = _x_offsets(a1, a2, p1, p2, t, mmask, HA, WA, HB, WB, sxa1, sxa2, sxb1, sxb2, S, KQ, KS)
        for c0 in range(0, CIN, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            cmask = offs_c < CIN
            xt = tl.load(x_ptr + b * sxb + xoff[:, None] + offs_c[None, :] * sxc,
                         mask=ok[:, None] & cmask[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_o[None, :] * swo + offs_c[:, None] * swc + t,
                         mask=cmask[:, None] & omask[None, :], other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=omask, other=0.0)[None, :]
    tl.store(y_ptr + b * COUT * MOUT + offs_o[None, :] * MOUT + offs_m[:, None],
             acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & omask[None, :])


@triton.autotune(configs=gemm_configs(1024, 16, 16, gpu=CONV_GPU),
                 key=["CIN", "COUT", "MIN", "S", "KQ", "KS"])
@triton.jit
def _grad_x_kernel(gy_ptr, w_ptr, gx_ptr, CIN, COUT, HA, WA, HB, WB, HP, WP, MIN, swo, swc,
                   S: tl.constexpr, KQ: tl.constexpr, KS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """gx[b, c, a1, a2, h, w] = sum_{t, o} W[o, c, t] gy[b, o, a1 - da1, a2 - da2, (h - db1)/s, (w - db2)/s]."""
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, cmask = offs_m < MIN, offs_c < CIN
    a1, a2, h, w = _out_coords(offs_m, WA, HB, WB)  # input position (a1, a2, h, w)
    mout = HA * WA * HP * WP
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, KQ * KQ + KS * KS):
        da1, da2, db1, db2 = _tap(t, KQ, KS)
        o1, o2, hh, ww = a1 - da1, a2 - da2, h - db1, w - db2
        ok = mmask & (o1 >= 0) & (o1 < HA) & (o2 >= 0) & (o2 < WA) & (hh >= 0) & (ww >= 0)
        ok = ok & (hh % S == 0) & (ww % S == 0) & (hh // S < HP) & (ww // S < WP)
        goff = ((o1 * WA + o2) * HP + hh // S) * WP + ww // S
        for k0 in range(0, COUT, BLOCK_K):
            offs_o = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_o < COUT
            gt = tl.load(gy_ptr + b * COUT * mout + goff[:, None] + offs_o[None, :] * mout,
                         mask=ok[:, None] & kmask[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_o[:, None] * swo + offs_c[None, :] * swc + t,
                         mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(gt, wt, acc, input_precision=DOT_PRECISION)
    tl.store(gx_ptr + b * CIN * MIN + offs_c[None, :] * MIN + offs_m[:, None],
             acc.to(gx_ptr.dtype.element_ty), mask=mmask[:, None] & cmask[None, :])


@triton.autotune(configs=gemm_configs(16, 16, SPLIT_CHUNK, gpu=CONV_GPU),
                 key=["CIN", "COUT", "MOUT", "S", "KQ", "KS"])
@triton.jit
def _grad_w_kernel(gy_ptr, x_ptr, gw_ptr, B, CIN, COUT, HA, WA, HB, WB, HP, WP, MOUT, SPLIT,
                   sxb, sxc, sxa1, sxa2, sxb1, sxb2,
                   S: tl.constexpr, KQ: tl.constexpr, KS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Split-K: gW_split[o, c, t] = sum over b and split's share of output positions of
    gy[b, o, pos] x[b, c, pos shifted by tap t]; the wrapper sums the SPLIT partial results."""
    ntaps = KQ * KQ + KS * KS
    pid_m, pid_n, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, split = pid_z % ntaps, pid_z // ntaps
    offs_o = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    omask, cmask = offs_o < COUT, offs_c < CIN
    share = tl.cdiv(tl.cdiv(MOUT, SPLIT), BLOCK_K) * BLOCK_K
    lo = split * share
    hi = tl.minimum(lo + share, MOUT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(0, B):
        for k0 in range(lo, hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            kmask = offs_k < hi
            a1, a2, p1, p2 = _out_coords(offs_k, WA, HP, WP)
            xoff, ok = _x_offsets(a1, a2, p1, p2, t, kmask, HA, WA, HB, WB, sxa1, sxa2, sxb1, sxb2, S, KQ, KS)
            gt = tl.load(gy_ptr + b * COUT * MOUT + offs_o[:, None] * MOUT + offs_k[None, :],
                         mask=omask[:, None] & kmask[None, :], other=0.0)
            xt = tl.load(x_ptr + b * sxb + xoff[:, None] + offs_c[None, :] * sxc,
                         mask=ok[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(gt, xt, acc, input_precision=DOT_PRECISION)
    tl.store(gw_ptr + ((split * COUT + offs_o[:, None]) * CIN + offs_c[None, :]) * ntaps + t,
             acc, mask=omask[:, None] & cmask[None, :])


@triton.jit
def _grad_bias_kernel(gy_ptr, gb_ptr, B, COUT, MOUT, BLOCK: tl.constexpr):
    """gb[o] = sum_{b, pos} gy[b, o, pos]."""
    o = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(0, B):
        for k0 in range(0, MOUT, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            acc += tl.load(gy_ptr + (b * COUT + o) * MOUT + offs, mask=offs < MOUT, other=0.0).to(tl.float32)
    tl.store(gb_ptr + o, tl.sum(acc, axis=0).to(gb_ptr.dtype.element_ty))


def _weights(weight_q: torch.Tensor, weight_s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(Cout, Cin, kq^2 + ks^2): both weights side by side, in tap order (a small copy)."""
    cout, cin = weight_q.shape[:2]
    return torch.cat([weight_q.reshape(cout, cin, -1), weight_s.reshape(cout, cin, -1)], dim=2).to(dtype).contiguous()


def _sizes(x: torch.Tensor, stride: int):
    b, cin, ha, wa, hb, wb = x.shape
    return b, cin, ha, wa, hb, wb, triton.cdiv(hb, stride), triton.cdiv(wb, stride)


def _grid(rows: int, cols: int, third: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]), third)


def cp_conv4d_forward(x: torch.Tensor, weight_q: torch.Tensor, bias_q: Optional[torch.Tensor],
                      weight_s: torch.Tensor, bias_s: Optional[torch.Tensor], stride: int) -> torch.Tensor:
    """(B, Cin, Ha, Wa, Hb, Wb) -> (B, Cout, Ha, Wa, ceil(Hb/s), ceil(Wb/s)); x read through its strides."""
    supported_dtype(x)
    b, cin, ha, wa, hb, wb, hp, wp = _sizes(x, stride)
    kq, ks, cout = weight_q.shape[-1], weight_s.shape[-1], weight_q.shape[0]
    w = _weights(weight_q, weight_s, x.dtype)
    biases = [t.float() for t in (bias_q, bias_s) if t is not None]
    bias = sum(biases) if biases else None
    y = torch.empty((b, cout, ha, wa, hp, wp), dtype=x.dtype, device=x.device)
    mout = ha * wa * hp * wp
    _forward_kernel[_grid(mout, cout, b)](
        x, w, bias if bias is not None else w, y, cin, cout, ha, wa, hb, wb, hp, wp, mout,
        *x.stride(), w.stride(0), w.stride(1),
        HAS_BIAS=bias is not None, S=stride, KQ=kq, KS=ks, DOT_PRECISION=fp32_dot_precision())
    return y


def cp_conv4d_backward(grad_out: torch.Tensor, x: torch.Tensor, weight_q: torch.Tensor, weight_s: torch.Tensor,
                       stride: int, output_mask: Sequence[bool]):
    """(grad_x, grad_weight_q, grad_bias_q, grad_weight_s, grad_bias_s); those not asked for by
    ``output_mask = [x, weights, biases]`` come back with numel 0."""
    supported_dtype(x)
    grad_out = grad_out.contiguous()
    b, cin, ha, wa, hb, wb, hp, wp = _sizes(x, stride)
    kq, ks, cout = weight_q.shape[-1], weight_s.shape[-1], weight_q.shape[0]
    mout = ha * wa * hp * wp
    prec = fp32_dot_precision()
    gx, gwq, gbq, gws, gbs = (x.new_empty((0,)) for _ in range(5))  # distinct tensors: outputs may not alias
    if output_mask[0]:
        w = _weights(weight_q, weight_s, x.dtype)
        gx = torch.empty((b, cin, ha, wa, hb, wb), dtype=x.dtype, device=x.device)
        _grad_x_kernel[_grid(ha * wa * hb * wb, cin, b)](
            grad_out, w, gx, cin, cout, ha, wa, hb, wb, hp, wp, ha * wa * hb * wb, w.stride(0), w.stride(1),
            S=stride, KQ=kq, KS=ks, DOT_PRECISION=prec)
    if output_mask[1]:
        ntaps, split = kq * kq + ks * ks, min(256, triton.cdiv(mout, SPLIT_CHUNK))
        partial = torch.empty((split, cout, cin, ntaps), dtype=torch.float32, device=x.device)
        _grad_w_kernel[_grid(cout, cin, ntaps * split)](
            grad_out, x, partial, b, cin, cout, ha, wa, hb, wb, hp, wp, mout, split, *x.stride(),
            S=stride, KQ=kq, KS=ks, DOT_PRECISION=prec)
        gw = partial.sum(dim=0).to(weight_q.dtype)
        gwq = gw[:, :, : kq * kq].reshape(weight_q.shape).clone()  # clones: outputs may not alias
        gws = gw[:, :, kq * kq:].reshape(weight_s.shape).clone()
    if output_mask[2]:
        gbq = torch.empty((cout,), dtype=weight_q.dtype, device=x.device)
        _grad_bias_kernel[(cout,)](grad_out, gbq, b, cout, mout, BLOCK=1024)
        gbs = gbq.clone()
    return gx, gwq, gbq, gws, gbs
