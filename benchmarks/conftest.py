"""Shared benchmark harness: realistic shapes, the HSNet 4D encoder, GFLOP/s and a roofline.

Every kernel is timed beside the reference in the same run, in turn, round by round. At the end,
a table prints each case's mean time, GFLOP/s, its ratio to the reference and the measured roofline
of this machine (the best of MKL's GEMM and oneDNN's convolution). Run
``pytest benchmarks --benchmark-only`` (``-k quick`` for the short subset).
"""
from __future__ import annotations

import platform
import time
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tlg.models.components import ENCODER_CHANNELS, HypercorrelationEncoder
from tlg.ops import _backends

# ResNet50 at 400x400: HSNet's 13 taps (layer2: 50x50x512 x4, layer3: 25x25x1024 x6, layer4: 13x13x2048 x3)
RESNET50_LAYERS = [(512, 50)] * 4 + [(1024, 25)] * 6 + [(2048, 13)] * 3
RESNET50_STACK_IDS = [3, 9, 13]


def compiled_backends(op: str, device_type: str = "cpu") -> list[str]:
    """Backends other than the reference that have a kernel for ``op`` here. Triton on CPU tensors
    (its interpreter, on when tests run in the same session) is a correctness tool, never timed."""
    return [name for name, be in _backends.all_backends().items()
            if name != "reference" and be.supports(op, device_type)
            and not (name == "triton" and device_type == "cpu")]


def backends_for(op: str) -> list[str]:
    return ["reference", *compiled_backends(op)]


# ------------------------------------------------------------------------------ HSNet encoder
class HSNetEncoder(HypercorrelationEncoder):
    """The models' HSNet 4D encoder at ResNet50's stack sizes (3, 6, 4 layers), called with the three
    stacks: 15 center-pivot layers with GroupNorm(4) + ReLU, then the mixing blocks."""

    def __init__(self, backend: str = "auto"):
        super().__init__([3, 6, 4], backend)

    def forward(self, corr_l4, corr_l3, corr_l2):
        return self.encode([corr_l4, corr_l3, corr_l2])


def encoder_inputs(batch: int, sizes=(13, 25, 50), layers=(3, 6, 4)) -> list[torch.Tensor]:
    return [torch.rand(batch, n, h, h, h, h) for n, h in zip(layers, sizes)]


def encoder_workload(backend: str, mode: str, batch: int, device: str = "cpu"):
    """One HSNet encoder step as a callable: forward without grad (``mode="fwd"``) or forward +
    backward (``"fwd+bwd"``), and its FLOPs (backward counted as 2x forward: input and weights)."""
    torch.manual_seed(0)
    enc = HSNetEncoder(backend=backend).to(device)
    inputs = [x.to(device) for x in encoder_inputs(batch)]

    def forward():
        with torch.no_grad():
            return enc(*inputs)

    def forward_backward():
        enc.zero_grad(set_to_none=True)
        out = enc(*inputs)
        out.square().mean().backward()
        return out

    flops = encoder_flops(batch) * (1 if mode == "fwd" else 3)
    return (forward if mode == "fwd" else forward_backward), flops


ENCODER_SQUEEZE = {13: ([3, 3, 3], [2, 2, 2]), 25: ([5, 3, 3], [4, 2, 2]), 50: ([5, 5, 3], [4, 4, 2])}


def encoder_layers(batch: int, sizes=(13, 25, 50), layers=(3, 6, 4)) -> list[tuple[str, tuple, int, int, int]]:
    """The center-pivot layers of one :class:`HSNetEncoder` forward, in order: (name, x shape, Cout,
    kernel, support stride). Names: ``l4.0`` .. ``l2.2`` for the squeezing blocks (query side 13, 25,
    50 at 400x400), ``mix43.i`` and ``mix32.i`` for the mixing blocks."""
    out = []
    final_support = {}
    for n, h in zip(layers, sizes):
        shape = (batch, n, h, h, h, h)
        name = {13: "l4", 25: "l3", 50: "l2"}[h]
        for i, (cout, k, s) in enumerate(zip(ENCODER_CHANNELS, *ENCODER_SQUEEZE[h])):
            out.append((f"{name}.{i}", shape, cout, k, s))
            shape = (batch, cout, h, h, -(-shape[4] // s), -(-shape[5] // s))
        final_support[h] = shape[4:]
    for name, h in zip(("mix43", "mix32"), sizes[1:]):  # at the query size of layer3 and layer2
        for i in range(3):
            out.append((f"{name}.{i}", (batch, 128, h, h, *final_support[h]), 128, 3, 1))
    return out


def encoder_flops(batch: int, sizes=(13, 25, 50), layers=(3, 6, 4)) -> int:
    """Center-pivot conv FLOPs of one :class:`HSNetEncoder` forward (norms and resizes excluded)."""
    from tlg.ops.reference import cp_conv4d_flops

    return sum(cp_conv4d_flops(shape, cout, k, k, s) for _, shape, cout, k, s in encoder_layers(batch, sizes, layers))


# ------------------------------------------------------------------------------ reporting
@dataclass
class Row:
    group: str
    case: str
    impl: str
    mean_s: float
    gflops: float | None
    extra: str = ""


_ROWS: list[Row] = []


def run_interleaved(benchmark, fns: dict, budget_s: float = 6.0, max_rounds: int = 10,
                    block_s: float = 0.05) -> tuple[dict, dict]:
    """Time several implementations of one case round by round, in turn (a, b, a, b, ...): this shared
    machine's speed drifts over seconds, and back-to-back blocks of rounds would charge the drift to
    one side. At least 3 rounds each, as many as fit in about ``budget_s``, after one warm-up call of
    each. An implementation faster than ``block_s`` runs a block of calls per round (one sample: their
    mean) after one untimed call, so that a sub-millisecond kernel is not timed cold, its thread team
    asleep and its caches refilled by the implementation before it. pytest-benchmark times the whole
    alternation. Returns each implementation's per-call times (s) and the result of its warm-up call
    (for the caller's checks)."""
    once, outputs = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        outputs[name] = fn()
        once[name] = time.perf_counter() - t0
    times: dict = {name: [] for name in fns}
    if getattr(benchmark, "disabled", False):  # --benchmark-disable: the warm-up calls were the smoke test
        benchmark(lambda: None)
        return times, outputs
    block = {name: max(1, int(block_s / max(t, 1e-9))) for name, t in once.items()}
    per_round = sum(once[name] * (block[name] + (block[name] > 1)) for name in fns)
    rounds = int(min(max_rounds, max(3, budget_s / max(per_round, 1e-9))))

    def alternate():
        for _ in range(rounds):
            for name, fn in fns.items():
                if block[name] > 1:
                    fn()
                t0 = time.perf_counter()
                for _ in range(block[name]):
                    fn()
                times[name].append((time.perf_counter() - t0) / block[name])

    benchmark.pedantic(alternate, rounds=1, iterations=1)
    benchmark.extra_info["rounds_s"] = times
    benchmark.extra_info["calls_per_round"] = block
    return times, outputs


def compare(benchmark, group: str, case: str, fns: dict, flops: int | None = None, budget_s: float | None = None,
            max_rounds: int = 100, note=None) -> dict:
    """The kernel cases' harness: every implementation of ``case`` timed in turn (run_interleaved, about
    a second per implementation, up to ``max_rounds`` rounds), one summary-table row each (mean time,
    GFLOP/s from ``flops``, ``note(impl, warm-up result)`` as its note). Returns the warm-up results."""
    budget = len(fns) * 1.0 if budget_s is None else budget_s
    times, outputs = run_interleaved(benchmark, fns, budget_s=budget, max_rounds=max_rounds)
    benchmark.extra_info.update({"group": group, "case": case, "flops": flops})
    for impl, t in times.items():
        row = record_times(group, case, impl, t, note(impl, outputs[impl]) if note else "", flops)
        if row is not None:
            benchmark.extra_info[impl] = {"mean_s": row.mean_s, "gflops": row.gflops, "note": row.extra}
    return outputs


def record_times(group: str, case: str, impl: str, times: list, extra: str = "",
                 flops: int | None = None) -> Row | None:
    """A summary-table row from round times measured by hand (run_interleaved): their mean."""
    if not times:
        return None
    mean = sum(times) / len(times)
    row = Row(group, case, impl, mean, flops / mean / 1e9 if flops else None, extra)
    _ROWS.append(row)
    return row


def record(benchmark, group: str, case: str, impl: str, flops: int | None = None, extra: str = "") -> None:
    """Attach GFLOP/s to a finished pytest-benchmark run and remember it for the summary table."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    mean = stats.stats.mean
    gflops = flops / mean / 1e9 if flops else None
    benchmark.extra_info.update({"gflops": gflops, "impl": impl, "case": case, "extra": extra})
    _ROWS.append(Row(group, case, impl, mean, gflops, extra))


_ROOFLINE: dict[str, dict[str, float]] = {}


def _best_gflops(fn, flops: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def roofline_parts(n: int = 2048, dtype=torch.float32, repeats: int = 5) -> dict[str, float]:
    """Best measured GFLOP/s of this machine's fastest dense kernels: MKL's GEMM (``torch.mm`` on n x n)
    and, in float32, oneDNN's 3x3 convolution (512 -> 512 channels on 64 x 64), whose JIT micro-kernel
    is the one the tlg kernels' float32 GEMMs run on (csrc/cpu/common.h) and beats MKL here."""
    key = f"{dtype}"
    if key not in _ROOFLINE:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        parts = {"torch.mm": _best_gflops(lambda: torch.mm(a, b), 2 * n**3, repeats)}
        if dtype == torch.float32:
            x, w = torch.randn(1, 512, 64, 64), torch.randn(512, 512, 3, 3)
            with torch.no_grad():
                conv_flops = 2 * 512 * 512 * 9 * 64 * 64
                parts["conv3x3"] = _best_gflops(lambda: F.conv2d(x, w, padding=1), conv_flops, repeats)
        _ROOFLINE[key] = parts
    return _ROOFLINE[key]


def roofline(n: int = 2048, dtype=torch.float32, repeats: int = 5) -> float:
    """This machine's practical ceiling: the best of roofline_parts."""
    return max(roofline_parts(n, dtype, repeats).values())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("tlg kernels beside the reference (same run)")
    tr.write_line(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                  f"torch {torch.__version__}; roofline {roofline():.1f} GFLOP/s, the best of "
                  + ", ".join(f"{k} {v:.1f}" for k, v in roofline_parts().items())
                  + " (torch.mm 2048^2, oneDNN conv 512->512 3x3 on 64^2; fp32)")
    by_case = defaultdict(dict)
    for r in _ROWS:
        by_case[(r.group, r.case)][r.impl] = r
    tr.write_line(f"{'group':<14}{'case':<34}{'impl':<12}{'mean ms':>10}{'GFLOP/s':>10}{'vs ref':>9}  notes")
    for (group, case), impls in by_case.items():
        ref = impls.get("reference")
        for impl, r in impls.items():
            ratio = f"{ref.mean_s / r.mean_s:8.2f}x" if ref and impl != "reference" else f"{'':>9}"
            gf = f"{r.gflops:10.1f}" if r.gflops else f"{'':>10}"
            tr.write_line(f"{group:<14}{case:<34}{impl:<12}{r.mean_s * 1e3:10.2f}{gf}{ratio}  {r.extra}")
