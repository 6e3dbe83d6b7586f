"""Whole models (HSNet, TLG; ResNet50) with tlg.ops on the reference beside each compiled backend.

Forward (inference, ``torch.no_grad``) and forward+backward (a training step: ``model.loss``
then ``backward``), batch 1 and 4, 200x200 and 400x400 images, same run; each case also
reports its peak memory (CUDA: ``max_memory_allocated``; CPU: the running peak of the per-op
allocations net of frees that the PyTorch profiler records during one extra call, so peaks
inside a single op are not seen).

The default run keeps to a few minutes: batch 4 at 400x400 is marked ``slow`` and only runs
with ``TLG_BENCH_HEAVY=1`` (``pytest benchmarks/test_bench_models.py --benchmark-only``; the
short subset is ``-k quick``). The backbone has random weights: timings do not depend on them.
``test_backbone_alone`` times the frozen backbone by itself, the plain-torch part of every step, which
bounds any backend's whole-model speed-up.
"""
from __future__ import annotations

import os

import pytest
import torch

import tlg

from conftest import compiled_backends, record, record_times, run_interleaved, run_rounds

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
    times, outputs = run_interleaved(benchmark, fns)
    for out in outputs.values():
        assert out.shape == (batch, 2, size, size)
    for backend, fn in fns.items():
        peak = peak_memory_mb(fn)
        benchmark.extra_info[f"peak_memory_mb_{backend}"] = peak
        record_times(f"model {name}", f"resnet50 {size}px b{batch} {mode}", backend, times[backend],
                     f"peak {peak:.0f} MiB")


@pytest.mark.parametrize("size,batch,heavy", list(_cases()))
@pytest.mark.parametrize("name", ["hsnet", "tlg"])
def test_backbone_alone(benchmark, name, size, batch, heavy):
    """The frozen backbone on the query and the support images: the part of every step that is plain
    torch on both sides. reference / (this time) bounds any backend's whole-model speed-up."""
    if heavy and not HEAVY:
        pytest.skip("batch 4 at 400x400: set TLG_BENCH_HEAVY=1 to run it")
    torch.manual_seed(0)
    config = {"img_size": size} if name == "tlg" else {}
    model = tlg.build_model(name, backbone="resnet50", backend="reference", **config).train()
    data = _batch(batch, size)

    def fn():
        with torch.no_grad():
            return model.backbone(data["query_img"]), model.backbone(data["support_imgs"].flatten(0, 1))

    query_taps, _ = run_rounds(benchmark, fn, budget_s=3.0)
    assert len(query_taps) == model.backbone.stack_ids[-1]  # every tap of the backbone (13 for ResNet50)
    record(benchmark, f"model {name}", f"resnet50 {size}px b{batch} backbone only", "torch")
