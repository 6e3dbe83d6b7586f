"""Whole models (HSNet, TLG; ResNet50) with tlg.ops on the reference beside each compiled backend.

Forward (inference, ``torch.no_grad``) and forward+backward (a training step: ``model.loss``
then ``backward``), batch 1 and 4, 200x200 and 400x400 images, same run; each case also
reports its peak memory (CUDA: ``max_memory_allocated``; CPU: the running peak of the per-op
allocations net of frees that the PyTorch profiler records during one extra call, so peaks
inside a single op are not seen).

Each case also times the same step with ``zero_cost_ops()``: tlg.ops' correlation, 4D convolution,
GroupNorm + ReLU and Sinkhorn replaced by stand-ins that cost nothing. That step is the plain-torch rest
of the model (frozen backbone, projections, decoder, loss), the same for every backend, so
reference / (its time) bounds what any backend can reach on the whole model.

The default run keeps to a few minutes: batch 4 at 400x400 is marked ``slow`` and only runs
with ``TLG_BENCH_HEAVY=1`` (``pytest benchmarks/test_bench_models.py --benchmark-only``; the
short subset is ``-k quick``). The backbone has random weights: timings do not depend on them.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import tlg
from tlg import ops
from tlg.ops.reference import SinkhornResult

from conftest import compiled_backends, record_times, run_interleaved

MODEL_OPS = {"hsnet": ("correlation", "cp_conv4d"), "tlg": ("correlation", "cp_conv4d", "sinkhorn")}
HEAVY = os.environ.get("TLG_BENCH_HEAVY") == "1"


def _backends() -> list[str]:
    names = {b for op in ("correlation", "cp_conv4d", "sinkhorn") for b in compiled_backends(op)}
    return ["reference", *sorted(names)]


def _cases():
    for size in (200, 400):
        for batch in (1, 4):
            heavy = size == 400 and batch == 4
            quick = "-quick" if (size, batch) == (200, 1) else ""  # the short run: -k quick
            marks = [pytest.mark.slow] if heavy else []
            yield pytest.param(size, batch, heavy, id=f"{size}px-b{batch}{quick}", marks=marks)


def _batch(b: int, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(b, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return {
        "query_img": torch.randn(b, 3, size, size, generator=g),
        "support_imgs": torch.randn(b, 1, 3, size, size, generator=g),
        "support_masks": mask,
        "query_mask": (torch.rand(b, size, size, generator=g) > 0.5).long(),
        "query_pseudo_mask": torch.rand(b, size, size, generator=g),
        "text_embeddings": torch.randn(b, 3, 512, generator=g),
        "class_names": ["object"] * b,
    }


def peak_memory_mb(fn) -> float:
    """Peak bytes allocated by PyTorch during ``fn()`` (MiB), beyond what was live before."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0  # allocations net of frees, op by op in start order ([memory]: frees outside ops)
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def _step(name: str, size: int, batch: int, mode: str, backend: str):
    """One call of the model on tlg.ops' ``backend``: inference, or a training step."""
    torch.manual_seed(0)
    config = {"img_size": size} if name == "tlg" else {}
    model = tlg.build_model(name, backbone="resnet50", backend=backend, **config)
    data = _batch(batch, size)
    if mode == "fwd":
        model.eval()

        def fn():
            with torch.no_grad():
                return model(data)
    else:
        model.train()

        def fn():
            model.zero_grad(set_to_none=True)
            loss, logits = model.loss(data)
            loss.backward()
            return logits
    return fn


def _tied(out: torch.Tensor, *inputs) -> torch.Tensor:
    """``out`` plus zero times one element of each input: no cost, but the backward reaches the inputs."""
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            out = out + 0 * t.reshape(-1)[0]
    return out


@contextlib.contextmanager
def zero_cost_ops():
    """Within: ``tlg.ops.multilayer_correlation``, ``cp_conv4d``, ``group_norm_relu`` and ``sinkhorn``
    return zeros of their outputs' shapes (Sinkhorn: a zero plan), tied to their inputs so that the
    backward still runs through the rest of the model. For measuring that rest only; the outputs are
    meaningless."""
    saved = ops.multilayer_correlation, ops.cp_conv4d, ops.group_norm_relu, ops.sinkhorn

    def correlation(query_feats, support_feats, stack_ids, support_mask=None, *, backend="auto", eps=1e-5):
        n, bounds = len(query_feats), [0, *stack_ids]  # stacks deepest first
        out = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            q, s = query_feats[n - hi], support_feats[n - hi]
            z = q.new_zeros(q.shape[0], hi - lo, *q.shape[-2:], *s.shape[-2:])
            out.append(_tied(z, *query_feats[n - hi:n - lo], *support_feats[n - hi:n - lo]))
        return out

    def cp_conv4d(x, weight_q, bias_q, weight_s, bias_s, stride, *, backend="auto"):
        b, _, ha, wa, hb, wb = x.shape
        z = x.new_zeros(b, weight_q.shape[0], ha, wa, -(-hb // stride), -(-wb // stride))
        return _tied(z, x, weight_q, bias_q, weight_s, bias_s)

    def group_norm_relu(x, groups, weight=None, bias=None, *, eps=1e-5, backend="auto"):
        return _tied(torch.zeros_like(x), x, weight, bias)

    def sinkhorn(cost, a=None, b=None, *, eps, max_iter=1000, tol=1e-6, check_every=10, backend="auto"):
        bsz, n, m = cost.shape
        return SinkhornResult(0 * cost, cost.new_zeros(bsz, n), cost.new_zeros(bsz, m),
                              cost.new_zeros(bsz, dtype=torch.long), cost.new_ones(bsz, dtype=torch.bool))

    ops.multilayer_correlation, ops.cp_conv4d, ops.group_norm_relu, ops.sinkhorn = (correlation, cp_conv4d,
                                                                                  group_norm_relu, sinkhorn)
    try:
        yield
    finally:
        ops.multilayer_correlation, ops.cp_conv4d, ops.group_norm_relu, ops.sinkhorn = saved


def _zero_cost_step(name: str, size: int, batch: int, mode: str):
    fn = _step(name, size, batch, mode, "reference")

    def step():
        with zero_cost_ops():
            return fn()
    return step


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("size,batch,heavy", list(_cases()))
@pytest.mark.parametrize("name", ["hsnet", "tlg"])
def test_model(benchmark, name, size, batch, heavy, mode):
    """Every backend that has the model's ops, timed in turn round by round (run_interleaved)."""
    if heavy and not HEAVY:
        pytest.skip("batch 4 at 400x400: set TLG_BENCH_HEAVY=1 to run it")
    backends = tlg.ops.backend_info()["backends"]
    names = [b for b in _backends()
             if b == "reference" or all(backends.get(b, {}).get("ops", {}).get(op) for op in MODEL_OPS[name])]
    fns = {b: _step(name, size, batch, mode, b) for b in names}
    fns["zero-cost ops"] = _zero_cost_step(name, size, batch, mode)
    times, outputs = run_interleaved(benchmark, fns)
    for out in outputs.values():
        assert out.shape == (batch, 2, size, size)
    for backend, fn in fns.items():
        if backend == "zero-cost ops":
            note = "the rest of the model: bound on any backend"
        else:
            peak = peak_memory_mb(fn)
            benchmark.extra_info[f"peak_memory_mb_{backend}"] = peak
            note = f"peak {peak:.0f} MiB"
        record_times(f"model {name}", f"resnet50 {size}px b{batch} {mode}", backend, times[backend], note)
