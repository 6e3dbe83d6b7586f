"""The three ops on a GPU: Triton (and CUDA, when built) beside the reference and the vendor baselines.

Shapes are the CPU suite's (ResNet50 at 400x400: 50x50x512 x4, 25x25x1024 x6, 13x13x2048 x3;
the HSNet 4D encoder; Sinkhorn (16, 50, 50) and (4, 625, 625) at eps 0.5). Every timed call ends
with ``torch.cuda.synchronize()``, after warm-up rounds (which also run Triton's autotuner), so
pytest-benchmark times the GPU work, not the launch. Ratios against a baseline are measured with
CUDA events in the same test (median of 10 after warm-up) and printed in the notes column:
cuBLAS-backed ``torch.bmm`` of pre-normalised features for the correlation (the GEMM floor), and
POT's ``ot.batch`` for Sinkhorn. The summary table's "vs ref" column is the ratio to the reference.

Skipped as a module without CUDA.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need a CUDA device", allow_module_level=True)

import tlg  # noqa: E402
from tlg.ops import reference as R  # noqa: E402

from conftest import (RESNET50_LAYERS, RESNET50_STACK_IDS, compiled_backends,  # noqa: E402
                      encoder_workload, record)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEV = "cuda"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def gpu_impls(op: str) -> list[str]:
    return ["reference", *compiled_backends(op, "cuda")]


def synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def bench(benchmark, fn, rounds: int = 10):
    """pytest-benchmark over a synchronised call, after two warm-up rounds."""
    return benchmark.pedantic(synced(fn), rounds=rounds, warmup_rounds=2)


def cuda_time(fn, warmup: int = 2, reps: int = 10) -> float:
    """Median seconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------ correlation
CORR_GROUPS = {  # name: (channels, side, number of layers)
    "layer2 50x50x512 x4": (512, 50, 4),
    "layer3 25x25x1024 x6": (1024, 25, 6),
    "layer4 13x13x2048 x3": (2048, 13, 3),
}


def _features(layers, batch, dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    q = [torch.randn(batch, c, h, h, generator=g, device=DEV).to(dtype) for c, h in layers]
    s = [torch.randn(batch, c, h, h, generator=g, device=DEV).to(dtype) for c, h in layers]
    return q, s


def _bmm_baseline(q, s):
    """cuBLAS floor: one batched GEMM per layer on features normalised beforehand (not timed)."""
    qn = [(x / (x.norm(dim=1, keepdim=True) + 1e-5)).flatten(2).transpose(1, 2).contiguous() for x in q]
    sn = [(x / (x.norm(dim=1, keepdim=True) + 1e-5)).flatten(2).contiguous() for x in s]
    return lambda: [torch.bmm(a, b) for a, b in zip(qn, sn)]


@pytest.mark.parametrize("impl", gpu_impls("correlation"))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("group", list(CORR_GROUPS))
def test_correlation_layers(benchmark, group, dtype, impl):
    c, h, n = CORR_GROUPS[group]
    batch = 4
    q, s = _features([(c, h)] * n, batch, DTYPES[dtype])
    fn = lambda: [tlg.ops.correlation(a, b, backend=impl) for a, b in zip(q, s)]  # noqa: E731
    out = bench(benchmark, fn)
    assert out[0].shape == (batch, h, h, h, h)
    extra = ""
    if impl != "reference":
        extra = f"{cuda_time(_bmm_baseline(q, s)) / cuda_time(fn):.2f}x torch.bmm speed"
    record(benchmark, "gpu-corr", f"{group} b{batch} {dtype}", impl, n * 2 * batch * c * h**4, extra)


@pytest.mark.parametrize("impl", gpu_impls("correlation"))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", [1, 4])
def test_correlation_13_layers(benchmark, batch, mode, impl):
    q, s = _features(RESNET50_LAYERS, batch, torch.float32)
    if mode != "fwd":
        for t in q + s:
            t.requires_grad_()

    def fn():
        out = tlg.ops.multilayer_correlation(q, s, RESNET50_STACK_IDS, backend=impl)
        if mode != "fwd":
            sum(o.sum() for o in out).backward()
        return out

    out = bench(benchmark, fn, rounds=5)
    assert [o.shape[1] for o in out] == [3, 6, 4]
    flops = sum(2 * batch * c * h**4 for c, h in RESNET50_LAYERS) * (1 if mode == "fwd" else 3)
    extra = ""
    if impl != "reference" and mode == "fwd":
        extra = f"{cuda_time(_bmm_baseline(q, s)) / cuda_time(fn):.2f}x torch.bmm speed"
    record(benchmark, "gpu-corr", f"13 layers {mode} b{batch}", impl, flops, extra)


# ------------------------------------------------------------------------------ HSNet 4D encoder
@pytest.mark.parametrize("impl", gpu_impls("cp_conv4d"))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", [1, 4])
def test_hsnet_encoder(benchmark, batch, mode, impl):
    fn, flops = encoder_workload(impl, mode, batch, device=DEV)
    out = bench(benchmark, fn, rounds=5)
    assert out.shape == (batch, 128, 50, 50)
    record(benchmark, "gpu-4d-encoder", f"HSNet encoder {mode} b{batch}", impl, flops)


# ------------------------------------------------------------------------------ Sinkhorn
SINKHORN_CASES = {"16x50x50": (16, 50, 50), "4x625x625": (4, 625, 625)}
EPS, TOL, MAX_ITER = 0.5, 1e-6, 1000


def _pot_batch(cost):
    try:
        import ot.batch
    except ImportError:
        return None
    return lambda: ot.batch.solve_batch(cost, reg=EPS, max_iter=MAX_ITER, tol=TOL, method="log_sinkhorn",
                                        grad="detach").plan


def _sinkhorn_impls():
    return [*gpu_impls("sinkhorn"), "pot-batch"]


@pytest.mark.parametrize("impl", _sinkhorn_impls())
@pytest.mark.parametrize("case", list(SINKHORN_CASES))
def test_sinkhorn(benchmark, case, impl):
    """eps 0.5, tol 1e-6, at most 1000 iterations; marginal errors in the notes."""
    g = torch.Generator(device=DEV).manual_seed(0)
    cost = torch.rand(*SINKHORN_CASES[case], generator=g, device=DEV)
    pot = _pot_batch(cost)
    if impl == "pot-batch":
        if pot is None:
            pytest.skip("POT's ot.batch is not installed")
        fn = pot
    else:
        fn = lambda: tlg.ops.sinkhorn(cost, eps=EPS, max_iter=MAX_ITER, tol=TOL, backend=impl).plan  # noqa: E731
    plan = bench(benchmark, fn, rounds=5)
    a = torch.full(cost.shape[:2], 1.0 / cost.shape[1], device=DEV)
    b = torch.full((cost.shape[0], cost.shape[2]), 1.0 / cost.shape[2], device=DEV)
    err = max(R.sinkhorn_marginal_error(plan, a).max().item(),
              R.sinkhorn_marginal_error(plan.transpose(1, 2), b).max().item())
    assert err < 1e-3
    extra = f"marginal err {err:.1e}"
    if impl != "pot-batch" and pot is not None:
        extra += f"; {cuda_time(pot, reps=5) / cuda_time(fn, reps=5):.2f}x ot.batch speed"
    record(benchmark, "gpu-sinkhorn", f"{case} eps{EPS}", impl, None, extra)
