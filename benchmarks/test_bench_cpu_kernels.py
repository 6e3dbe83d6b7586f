"""The C++/OpenMP CPU kernels beside the reference: per-layer breakdowns and peak memory.

The headline cases (13-layer correlation, HSNet encoder, Sinkhorn with POT's batch solver) are in
``test_bench_kernels.py``, which times every backend, cpp included. This file adds what those
leave out for the CPU kernels: the heaviest single center-pivot layers forward and forward+backward,
a single correlation layer forward+backward, and the peak memory of the encoder's forward+backward.

Peak memory is the growth of the process's peak resident set (``ru_maxrss``) during one
forward+backward, each implementation in a fresh subprocess after its inputs are built.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tlg
from tlg.ops import _native
from tlg.ops.reference import cp_conv4d_flops

from conftest import record, run_rounds

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.skipif(_native.load_error() is not None, reason=str(_native.load_error()))]

IMPLS = ["reference", "cpp"]

# (case, x shape, cout, k, stride): the costliest layers of HSNet's encoder at 400x400
CONV_LAYERS = {
    "layer2-first 4->16 k5 s4 50^4": ((1, 4, 50, 50, 50, 50), 16, 5, 4),
    "mix3to2 128->128 k3 s1 50^2x2^2": ((1, 128, 50, 50, 2, 2), 128, 3, 1),
    "layer3-first 6->16 k5 s4 25^4": ((1, 6, 25, 25, 25, 25), 16, 5, 4),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(CONV_LAYERS))
def test_cp_conv4d_layer(benchmark, case, mode, impl):
    shape, cout, k, s = CONV_LAYERS[case]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(*shape, generator=g, requires_grad=mode != "fwd")
    wq, ws = (torch.randn(cout, shape[1], k, k, generator=g).mul_(0.1).requires_grad_(mode != "fwd") for _ in range(2))
    bq, bs = (torch.zeros(cout, requires_grad=mode != "fwd") for _ in range(2))

    def fn():
        y = tlg.ops.cp_conv4d(x, wq, bq, ws, bs, s, backend=impl)
        if mode != "fwd":
            y.backward(torch.ones_like(y))
        return y

    run_rounds(benchmark, fn)
    flops = cp_conv4d_flops(shape, cout, k, k, s) * (1 if mode == "fwd" else 3)
    record(benchmark, "cp_conv4d", f"{case} {mode}", impl, flops)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c,h", [(512, 50), (2048, 13)], ids=["layer2", "layer4"])
def test_correlation_layer_fwd_bwd(benchmark, impl, c, h):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, c, h, h, generator=g, requires_grad=True)
    s = torch.randn(1, c, h, h, generator=g, requires_grad=True)

    def fn():
        out = tlg.ops.correlation(q, s, backend=impl)
        out.backward(torch.ones_like(out))
        return out

    run_rounds(benchmark, fn)
    record(benchmark, "correlation", f"1 layer {c}x{h}^2 fwd+bwd", impl, 3 * 2 * c * h**4)


_PEAK_SCRIPT = r"""
import json, resource, sys, torch
sys.path.insert(0, {bench!r})
torch.set_num_threads({threads})
from conftest import HSNetEncoder, encoder_inputs
torch.manual_seed(0)
enc = HSNetEncoder(backend={impl!r})
inputs = encoder_inputs({batch})
def rss():  # current resident set, KiB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4
base = rss()
out = enc(*inputs)
out.square().mean().backward()
print(json.dumps({{"peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}}))
"""


@pytest.mark.parametrize("batch", [1])
def test_hsnet_encoder_peak_memory(batch):
    """Peak memory growth of one encoder forward+backward, cpp vs reference (fresh processes)."""
    peaks = {}
    for impl in IMPLS:
        script = _PEAK_SCRIPT.format(bench=os.path.dirname(__file__), threads=torch.get_num_threads(), impl=impl,
                                     batch=batch)
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        peaks[impl] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]
    print(f"\nHSNet encoder fwd+bwd b{batch} peak RSS growth: " +
          ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()))
    from conftest import Row, _ROWS
    for impl, v in peaks.items():
        _ROWS.append(Row("memory", f"HSNet encoder fwd+bwd b{batch} peak", impl, float("nan"), None, f"{v:.0f} MiB"))
    assert peaks["cpp"] < peaks["reference"]
