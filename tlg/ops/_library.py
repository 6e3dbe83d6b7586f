"""Autograd and fake (meta) registrations shared by every compiled backend.

A compiled backend exposes six ``torch.library`` ops with the schemas of ``csrc/ops.cpp``,
named ``tlg::<prefix>correlation_forward``, ``..._backward`` and so on (prefix ``""`` for the
native C++/CUDA library, ``"triton_"`` for the Triton kernels). :func:`register` attaches the
shape functions and the autograd formulas, whose backward passes call the backend's own
backward kernels: nothing here differentiates through Python loops.
"""
from __future__ import annotations

import math

import torch

# The op family's schemas, as ``csrc/ops.cpp`` defines them for the native library; Python-defined
# backends (Triton) register the same schemas under their prefix.
SCHEMAS = {
    "correlation_forward": "(Tensor query, Tensor support, Tensor? support_mask, float eps) -> Tensor",
    "correlation_backward": "(Tensor grad_out, Tensor out, Tensor query, Tensor support, Tensor? support_mask,"
                            " float eps) -> (Tensor grad_query, Tensor grad_support)",
    "correlation_stack_forward": "(Tensor[] query, Tensor[] support, Tensor? support_mask, float eps) -> Tensor",
    "correlation_stack_backward": "(Tensor grad_out, Tensor out, Tensor[] query, Tensor[] support,"
                                  " Tensor? support_mask, float eps) -> (Tensor[] grad_query, Tensor[] grad_support)",
    "cp_conv4d_forward": "(Tensor x, Tensor weight_q, Tensor? bias_q, Tensor weight_s, Tensor? bias_s, int stride)"
                         " -> Tensor",
    "cp_conv4d_backward": "(Tensor grad_out, Tensor x, Tensor weight_q, Tensor weight_s, int stride,"
                          " bool[3] output_mask) -> (Tensor grad_x, Tensor grad_weight_q, Tensor grad_bias_q,"
                          " Tensor grad_weight_s, Tensor grad_bias_s)",
    "sinkhorn_forward": "(Tensor cost, Tensor a, Tensor b, float eps, int max_iter, float tol, int check_every)"
                        " -> (Tensor plan, Tensor f, Tensor g, Tensor n_iter, Tensor converged)",
    "sinkhorn_backward": "(Tensor grad_plan, Tensor plan, float eps) -> (Tensor grad_cost, Tensor grad_a, Tensor grad_b)",
}

# Ops only the C++ library implements: the encoder's GroupNorm + ReLU epilogue. Backends without it
# run the reference for it (tlg.ops.group_norm_relu).
CPU_ONLY_SCHEMAS = {
    "group_norm_relu_forward": "(Tensor x, int groups, Tensor weight, Tensor bias, float eps)"
                               " -> (Tensor y, Tensor mean, Tensor rstd)",
    "group_norm_relu_backward": "(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd, Tensor weight, Tensor bias,"
                                " bool[2] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)",
}


def _op(prefix: str, name: str):
    return getattr(torch.ops.tlg, prefix + name)


def _empty_to_none(t: torch.Tensor, wanted: bool):
    return t if wanted and t.numel() > 0 else None


def register(prefix: str) -> None:
    """Register fake kernels and autograd for the op family ``tlg::<prefix>*``."""
    qual = f"tlg::{prefix}"

    # ---- shape functions (torch.compile / meta tensors) ----
    @torch.library.register_fake(qual + "correlation_forward")
    def _(query, support, support_mask, eps):
        b, _, hq, wq = query.shape
        return query.new_empty((b, hq, wq, support.shape[2], support.shape[3]))

    @torch.library.register_fake(qual + "correlation_backward")
    def _(grad_out, out, query, support, support_mask, eps):
        return torch.empty_like(query), torch.empty_like(support)

    @torch.library.register_fake(qual + "cp_conv4d_forward")
    def _(x, weight_q, bias_q, weight_s, bias_s, stride):
        b, _, ha, wa, hb, wb = x.shape
        return x.new_empty((b, weight_q.shape[0], ha, wa, math.ceil(hb / stride), math.ceil(wb / stride)))

    @torch.library.register_fake(qual + "cp_conv4d_backward")
    def _(grad_out, x, weight_q, weight_s, stride, output_mask):
        def maybe(t, want):
            return torch.empty_like(t) if want else t.new_empty((0,))

        return (
            maybe(x, output_mask[0]),
            maybe(weight_q, output_mask[1]),
            weight_q.new_empty((weight_q.shape[0],) if output_mask[2] else (0,)),
            maybe(weight_s, output_mask[1]),
            weight_s.new_empty((weight_s.shape[0],) if output_mask[2] else (0,)),
        )

    @torch.library.register_fake(qual + "sinkhorn_forward")
    def _(cost, a, b, eps, max_iter, tol, check_every):
        bsz, n, m = cost.shape
        return (
            torch.empty_like(cost),
            cost.new_empty((bsz, n)),
            cost.new_empty((bsz, m)),
            cost.new_empty((bsz,), dtype=torch.int64),
            cost.new_empty((bsz,), dtype=torch.bool),
        )

    @torch.library.register_fake(qual + "sinkhorn_backward")
    def _(grad_plan, plan, eps):
        bsz, n, m = plan.shape
        return torch.empty_like(plan), plan.new_empty((bsz, n)), plan.new_empty((bsz, m))

    # ---- autograd ----
    # The correlation's output is saved: its backward reads the ReLU gate from it.
    def corr_setup(ctx, inputs, output):
        query, support, support_mask, eps = inputs
        ctx.save_for_backward(output, query, support, support_mask)
        ctx.eps = eps

    def corr_backward(ctx, grad):
        out, query, support, support_mask = ctx.saved_tensors
        gq, gs = _op(prefix, "correlation_backward")(grad.contiguous(), out, query, support, support_mask, ctx.eps)
        return gq, gs, None, None

    torch.library.register_autograd(qual + "correlation_forward", corr_backward, setup_context=corr_setup)

    def conv_setup(ctx, inputs, output):
        x, weight_q, bias_q, weight_s, bias_s, stride = inputs
        ctx.save_for_backward(x, weight_q, weight_s)
        ctx.stride = stride
        ctx.has_bias = (bias_q is not None, bias_s is not None)

    def conv_backward(ctx, grad):
        x, weight_q, weight_s = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1] or need[3], need[2] or need[4]]
        gx, gwq, gbq, gws, gbs = _op(prefix, "cp_conv4d_backward")(
            grad.contiguous(), x, weight_q, weight_s, ctx.stride, mask
        )
        return (
            _empty_to_none(gx, need[0]),
            _empty_to_none(gwq, need[1]),
            _empty_to_none(gbq, need[2] and ctx.has_bias[0]),
            _empty_to_none(gws, need[3]),
            _empty_to_none(gbs, need[4] and ctx.has_bias[1]),
            None,
        )

    torch.library.register_autograd(qual + "cp_conv4d_forward", conv_backward, setup_context=conv_setup)

    def sk_setup(ctx, inputs, output):
        cost, a, b, eps, max_iter, tol, check_every = inputs
        plan, f, g, n_iter, converged = output
        ctx.save_for_backward(plan)
        ctx.eps = eps
        # Potentials carry the gauge the iterations happened to fix; implicit differentiation
        # defines gradients through the plan only, so f and g are returned without a graph.
        ctx.mark_non_differentiable(f, g, n_iter, converged)

    def sk_backward(ctx, grad_plan, grad_f, grad_g, grad_n, grad_conv):
        (plan,) = ctx.saved_tensors
        if grad_plan is None:
            return None, None, None, None, None, None, None
        gc, ga, gb = _op(prefix, "sinkhorn_backward")(grad_plan.contiguous(), plan, ctx.eps)
        return gc, ga, gb, None, None, None, None

    torch.library.register_autograd(qual + "sinkhorn_forward", sk_backward, setup_context=sk_setup)


def register_group_norm_relu(prefix: str) -> None:
    """Fake kernels and autograd of ``tlg::<prefix>group_norm_relu_forward`` (the encoder's GroupNorm +
    ReLU epilogue). Only x and the group statistics are saved: the backward recomputes the ReLU gate."""
    qual = f"tlg::{prefix}"

    @torch.library.register_fake(qual + "group_norm_relu_forward")
    def _(x, groups, weight, bias, eps):
        stats = x.new_empty((x.shape[0], groups), dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
        return torch.empty_like(x), stats, stats.clone()

    @torch.library.register_fake(qual + "group_norm_relu_backward")
    def _(grad_out, x, mean, rstd, weight, bias, output_mask):
        return (torch.empty_like(x) if output_mask[0] else x.new_empty((0,)),
                torch.empty_like(weight) if output_mask[1] else weight.new_empty((0,)),
                torch.empty_like(bias) if output_mask[1] else bias.new_empty((0,)))

    def setup(ctx, inputs, output):
        x, groups, weight, bias, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.mark_non_differentiable(mean, rstd)

    def backward(ctx, grad_y, grad_mean, grad_rstd):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, gw, gb = _op(prefix, "group_norm_relu_backward")(
            grad_y.contiguous(), x, mean, rstd, weight, bias, [need[0], need[2] or need[3]]
        )
        return _empty_to_none(gx, need[0]), None, _empty_to_none(gw, need[2]), _empty_to_none(gb, need[3]), None

    torch.library.register_autograd(qual + "group_norm_relu_forward", backward, setup_context=setup)


def register_stack(prefix: str) -> None:
    """Fake kernel and autograd of ``tlg::<prefix>correlation_stack_forward`` (optional op: L layers of
    equal sizes written straight into the stacked (B, L, Hq, Wq, Hs, Ws) layout)."""
    qual = f"tlg::{prefix}"

    @torch.library.register_fake(qual + "correlation_stack_forward")
    def _(query, support, support_mask, eps):
        b, _, hq, wq = query[0].shape
        return query[0].new_empty((b, len(query), hq, wq, support[0].shape[2], support[0].shape[3]))

    @torch.library.register_fake(qual + "correlation_stack_backward")
    def _(grad_out, out, query, support, support_mask, eps):
        return [torch.empty_like(q) for q in query], [torch.empty_like(s) for s in support]

    def setup(ctx, inputs, output):
        query, support, support_mask, eps = inputs
        ctx.n = len(query)
        ctx.save_for_backward(output, *query, *support, support_mask)
        ctx.eps = eps

    def backward(ctx, grad):
        out, *saved = ctx.saved_tensors
        query, support, support_mask = saved[: ctx.n], saved[ctx.n : 2 * ctx.n], saved[-1]
        gq, gs = _op(prefix, "correlation_stack_backward")(
            grad.contiguous(), out, query, support, support_mask, ctx.eps
        )
        return list(gq), list(gs), None, None

    torch.library.register_autograd(qual + "correlation_stack_forward", backward, setup_context=setup)
