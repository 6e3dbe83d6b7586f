"""The C++/OpenMP CPU kernels beside the reference: per-layer breakdowns and peak memory.

The headline cases (13-layer correlation, HSNet encoder, Sinkhorn with POT's batch solver) are in
``test_bench_kernels.py``, which times every backend, cpp included. This file adds what those
leave out for the CPU kernels: every center-pivot layer of the HSNet encoder at 400x400, batch 1,
forward and forward+backward (the layer's input needs a gradient unless it is a block's first layer,
whose input is a correlation stack, as in the models), the GroupNorm + ReLU after those layers, a
single correlation layer forward+backward, and the peak memory of the encoder's forward+backward.
Implementations are timed in turn (``conftest.compare``).

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

from conftest import compare, encoder_layers

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.skipif(_native.load_error() is not None, reason=str(_native.load_error()))]

IMPLS = ["reference", "cpp"]

# name -> (x shape, Cout, kernel, stride): the encoder's layers at 400x400, batch 1 (mixing layers
# repeat one shape three times: one case each)
CONV_LAYERS = {name: layer for name, *layer in encoder_layers(1) if not name.startswith("mix") or name.endswith(".0")}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", list(CONV_LAYERS))
def test_cp_conv4d_layer(benchmark, name, mode):
    shape, cout, k, s = CONV_LAYERS[name]
    train = mode != "fwd"
    g = torch.Generator().manual_seed(0)
    first = name.endswith(".0") and not name.startswith("mix")  # its input is a correlation stack
    x = torch.rand(*shape, generator=g, requires_grad=train and not first)
    wq, ws = (torch.randn(cout, shape[1], k, k, generator=g).mul_(0.1).requires_grad_(train) for _ in range(2))
    bq, bs = (torch.zeros(cout, requires_grad=train) for _ in range(2))
    grad = torch.randn(shape[0], cout, *shape[2:4], -(-shape[4] // s), -(-shape[5] // s), generator=g)
    wanted = [t for t in (x, wq, ws, bq, bs) if t.requires_grad]

    def run(impl: str):
        if not train:
            with torch.no_grad():
                return tlg.ops.cp_conv4d(x, wq, bq, ws, bs, s, backend=impl)
        y = tlg.ops.cp_conv4d(x, wq, bq, ws, bs, s, backend=impl)
        torch.autograd.grad(y, wanted, grad)
        return y

    outs = compare(benchmark, "cp_conv4d", f"{name} {shape[1]}->{cout} k{k} s{s} "
                   f"{shape[2]}^2x{shape[4]}^2 {mode}", {impl: (lambda impl=impl: run(impl)) for impl in IMPLS},
                   cp_conv4d_flops(shape, cout, k, k, s) * (1 if not train else 2 if first else 3))
    assert all(o.shape == outs["reference"].shape for o in outs.values())


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_group_norm_relu_encoder(benchmark, mode):
    """The GroupNorm(4) + ReLU after each of the encoder's 15 center-pivot layers (400x400, batch 1), on
    those layers' output shapes: the fused op against torch's group_norm then relu."""
    g = torch.Generator().manual_seed(0)
    train = mode != "fwd"
    cases = []
    for _, (b, _, ha, wa, hb, wb), cout, _, s in encoder_layers(1):
        x = torch.randn(b, cout, ha, wa, -(-hb // s), -(-wb // s), generator=g, requires_grad=train)
        w, bias = (torch.randn(cout, generator=g).requires_grad_(train) for _ in range(2))
        cases.append((x, w, bias, torch.randn(x.shape, generator=g) if train else None))

    def run(impl: str):
        with torch.set_grad_enabled(train):
            for x, w, bias, grad in cases:
                y = tlg.ops.group_norm_relu(x, 4, w, bias, backend=impl)
                if train:
                    torch.autograd.grad(y, (x, w, bias), grad)
        return y

    elems = sum(c[0].numel() for c in cases)
    compare(benchmark, "group_norm_relu", f"15 encoder epilogues ({elems / 1e6:.1f} M values) {mode}",
            {impl: (lambda impl=impl: run(impl)) for impl in IMPLS})


@pytest.mark.parametrize("c,h", [(512, 50), (2048, 13)], ids=["layer2", "layer4"])
def test_correlation_layer_fwd_bwd(benchmark, c, h):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, c, h, h, generator=g, requires_grad=True)
    s = torch.randn(1, c, h, h, generator=g, requires_grad=True)

    def run(impl: str):
        out = tlg.ops.correlation(q, s, backend=impl)
        out.backward(torch.ones_like(out))
        return out

    compare(benchmark, "correlation", f"1 layer {c}x{h}^2 fwd+bwd", {impl: (lambda impl=impl: run(impl)) for impl in IMPLS},
            3 * 2 * c * h**4)


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
