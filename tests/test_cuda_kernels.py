"""The CUDA kernels (csrc/cuda) without a GPU.

1. Every .cu file compiles with nvcc for sm_80 and sm_90, warnings as errors; the register and
   shared-memory use of every kernel is reported (pytest ``-rP`` shows the "resource usage" sections).
2. The same kernel sources, compiled by g++ against the host emulation of csrc/cuda/emulation/
   (one host thread per CUDA thread, barriers for __syncthreads, emulated warp shuffles), run on
   tiny odd shapes and must match tlg.ops.reference forward and backward, in float64 and float32
   (and one case per op in float16 / bfloat16, which the kernels compute in float32).
3. binding.cpp (which needs a CUDA torch to build) type-checks against the torch and CUDA headers.
The compile checks start in the background when the module starts and overlap the emulation tests.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tlg.ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)
# torch's CUDAExtension builds with these; the kernels must not rely on implicit half conversions.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


# --------------------------------------------------------------------------------------------
# 1. nvcc
# --------------------------------------------------------------------------------------------
def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _resource_table(log: str) -> str:
    """One line per (kernel, arch): registers, static shared memory, spills (from ptxas -v)."""
    rows, name, arch, spill = [], None, None, ""
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            name, arch = m.groups()
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = f"spill {m.group(1)}/{m.group(2)} B"
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append((name, arch, int(m.group(1)), int(smem.group(1)) if smem else 0, spill))
            name = None
    pretty = _demangle([r[0] for r in rows])
    lines = []
    for (_, arch, regs, smem, spill), full in zip(rows, pretty):
        short = full.replace("tlg_cuda::(anonymous namespace)::", "")
        for k, epi in enumerate(("Relu", "Plain")):
            short = short.replace(f"(Epi){k}", f"Epi::{epi}")
        short = re.sub(r"\(.*$", "", short)  # drop the parameter list
        lines.append(f"{arch}  regs {regs:3d}  smem {smem:6d} B  {spill:18s} {short}")
    return "\n".join(lines)


def _nvcc_cmd(src: Path, out_dir: Path) -> list[str]:
    return [
        NVCC, "-c", "-std=c++17", "-O3", "--expt-relaxed-constexpr", *TORCH_NVCC_DEFINES,
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror", "--resource-usage",
        "-I", str(CUDA_DIR), str(src), "-o", str(out_dir / (src.stem + ".o")),
    ]


def _cuda_include_dir():
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    if NVCC:
        cands.append(str(Path(NVCC).resolve().parent.parent))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c) / "include"
    return None


def _binding_check_cmd(tmp: Path):
    """g++ -fsyntax-only of binding.cpp against the torch headers (the CPU wheel ships c10/cuda)
    and the CUDA toolkit headers; None where those are missing."""
    from torch.utils import cpp_extension

    cxx, cuda_inc = shutil.which("g++") or shutil.which("c++"), _cuda_include_dir()
    torch_inc = [Path(p) for p in cpp_extension.include_paths()]
    if cxx is None or cuda_inc is None or not any((p / "c10/cuda/CUDAStream.h").exists() for p in torch_inc):
        return None
    # A CPU wheel lacks this build-generated header; its macros only matter for a real CUDA build.
    stub = tmp / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#pragma once\n")
    inc = [f"-isystem{p}" for p in torch_inc] + [f"-isystem{tmp}", f"-isystem{cuda_inc}"]
    return [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DTLG_WITH_CUDA", *inc,
            "-I", str(CUDA_DIR), str(CUDA_DIR / "binding.cpp")]


@pytest.fixture(scope="session", autouse=True)
def nvcc_jobs(request, tmp_path_factory):
    """Start every compile check in the background as soon as this module runs, so that they
    overlap with the emulation tests; each compile test then waits for its own job."""
    names = {item.name.split("[")[0] for item in request.session.items}
    jobs = {}

    def start(key, cmd):
        jobs[key] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    if NVCC is not None and "test_nvcc_compiles" in names:
        out = tmp_path_factory.mktemp("nvcc")
        for src in KERNEL_SOURCES:
            start(src, _nvcc_cmd(src, out))
    if "test_binding_type_checks" in names:
        cmd = _binding_check_cmd(tmp_path_factory.mktemp("binding"))
        if cmd:
            start("binding", cmd)
    yield jobs
    for _, proc in jobs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# 2. The emulation library
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """g++-compile the kernel sources against emulation/cuda_emu.h into a shared library."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    out = tmp_path_factory.mktemp("cuda_emu")
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror", "-DTLG_CUDA_EMULATION",
             "-DTLG_CUDA_BLOCK=64", "-I", str(CUDA_DIR)]
    srcs = [*KERNEL_SOURCES, CUDA_DIR / "emulation" / "emu_api.cpp"]

    def compile_one(src: Path):
        obj = out / (src.stem + ".o")
        r = subprocess.run([cxx, *flags, "-x", "c++", "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        assert r.returncode == 0, f"emulation build of {src.name} failed:\n{r.stderr}"
        return str(obj)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, srcs))
    lib_path = out / "libtlg_cuda_emu.so"
    r = subprocess.run([cxx, "-shared", "-pthread", *objs, "-o", str(lib_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_correlation_workspace.restype = ctypes.c_size_t
    lib.emu_sinkhorn_workspace.restype = ctypes.c_size_t
    lib.emu_sinkhorn_backward_workspace.restype = ctypes.c_size_t
    return lib


def _p(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _i(*vals):
    return [ctypes.c_int64(v) for v in vals]


def _work(nbytes):
    return torch.empty(max(int(nbytes), 8), dtype=torch.uint8)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tols(dtype):
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-11),
        torch.float32: dict(rtol=2e-4, atol=2e-5),
        torch.float16: dict(rtol=4e-3, atol=2e-3),  # one rounding of a float32 result, +- 1 ulp
        torch.bfloat16: dict(rtol=3e-2, atol=2e-2),
    }[dtype]


DTYPES = [torch.float64, torch.float32]
HALF = [torch.float16, torch.bfloat16]  # float32 accumulation, 16-bit loads and stores


def _cases(cases, half_case):
    """Every case in float64 and float32; one case (an index or a case) in float16 and bfloat16."""
    half = cases[half_case] if isinstance(half_case, int) else half_case
    return [(c, d) for c in cases for d in DTYPES] + [(half, d) for d in HALF]


# ---- correlation ----
def emu_correlation(lib, q, s, mask, eps, grad_out=None, out=None):
    """Forward (into `out`, which may be a strided layer view of a stacked volume), or backward (given
    `grad_out` and the forward's `out`, laid out alike)."""
    b, c, hq, wq = q.shape
    hs, ws = s.shape[-2:]
    pq, ps = hq * wq, hs * ws
    dt = DTYPE_CODE[q.dtype]
    back = grad_out is not None
    work = _work(lib.emu_correlation_workspace(dt, *_i(b, c, pq, ps), int(back)))
    if not back:
        out = torch.full((b, hq, wq, hs, ws), float("nan"), dtype=q.dtype) if out is None else out
        rc = lib.emu_correlation_forward(dt, _p(q), _p(s), _p(mask), _p(out), _p(work), *_i(b, c, pq, ps),
                                         ctypes.c_double(eps), ctypes.c_int64(out.stride(0)))
        assert rc == 0
        return out
    assert out.stride() == grad_out.stride()
    gq, gs = torch.full_like(q, float("nan")), torch.full_like(s, float("nan"))
    rc = lib.emu_correlation_backward(dt, _p(grad_out), _p(out), _p(q), _p(s), _p(mask), _p(gq), _p(gs), _p(work),
                                      *_i(b, c, pq, ps), ctypes.c_double(eps), ctypes.c_int64(grad_out.stride(0)))
    assert rc == 0
    return gq, gs


CORR_CASES = [
    # B, C, Hq, Wq, Hs, Ws, masked
    (2, 5, 3, 5, 4, 3, False),
    (2, 5, 3, 5, 4, 3, True),
    (1, 37, 9, 8, 7, 10, True),  # several 64-wide tiles, K over several 16-chunks
]


@pytest.mark.parametrize("case,dtype", _cases(CORR_CASES, 1), ids=str)
def test_correlation_emulated(emu, case, dtype):
    b, c, hq, wq, hs, ws, masked = case
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, c, hq, wq, generator=g, dtype=torch.float64)
    s = torch.randn(b, c, hs, ws, generator=g, dtype=torch.float64)
    q[0, :, 1, 2] = 0  # a zero feature: norm 0, zero row
    mask = None
    if masked:
        mask = torch.rand(b, hs, ws, generator=g, dtype=torch.float64)
        mask[mask < 0.3] = 0  # masked-out support positions correlate to exactly zero
    q, s = q.to(dtype), s.to(dtype)
    mask = None if mask is None else mask.to(dtype)
    eps = 1e-5

    out = emu_correlation(emu, q, s, mask, eps)
    torch.testing.assert_close(out, ref.correlation(q, s, mask, eps), **_tols(dtype))

    qr, sr = q.clone().requires_grad_(), s.clone().requires_grad_()
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    ref.correlation(qr, sr, mask, eps).backward(grad_out)
    gq, gs = emu_correlation(emu, q, s, mask, eps, grad_out, out)
    torch.testing.assert_close(gq, qr.grad, **_tols(dtype))
    torch.testing.assert_close(gs, sr.grad, **_tols(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_correlation_stacked_emulated(emu, dtype):
    """Layers of different channel counts written straight into (B, L, Hq, Wq, Hs, Ws) through the
    batch stride (what the binding's correlation_stack_forward/backward do); backward reads strided G."""
    g = torch.Generator().manual_seed(5)
    b, hq, wq, hs, ws, chans = 2, 3, 4, 5, 2, (3, 6, 4)
    qs = [torch.randn(b, c, hq, wq, generator=g, dtype=torch.float64).to(dtype) for c in chans]
    ss = [torch.randn(b, c, hs, ws, generator=g, dtype=torch.float64).to(dtype) for c in chans]
    mask = (torch.rand(b, hs, ws, generator=g, dtype=torch.float64) > 0.3).to(dtype)
    out = torch.full((b, len(chans), hq, wq, hs, ws), float("nan"), dtype=dtype)
    for l_, (q, s) in enumerate(zip(qs, ss)):
        emu_correlation(emu, q, s, mask, 1e-5, out=out[:, l_])
    expect = torch.stack([ref.correlation(q, s, mask) for q, s in zip(qs, ss)], dim=1)
    torch.testing.assert_close(out, expect, **_tols(dtype))
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    for l_, (q, s) in enumerate(zip(qs, ss)):
        qr, sr = q.clone().requires_grad_(), s.clone().requires_grad_()
        ref.correlation(qr, sr, mask).backward(grad[:, l_])
        gq, gs = emu_correlation(emu, q, s, mask, 1e-5, grad_out=grad[:, l_], out=out[:, l_])
        torch.testing.assert_close(gq, qr.grad, **_tols(dtype))
        torch.testing.assert_close(gs, sr.grad, **_tols(dtype))


# ---- center-pivot 4D convolution ----
def _conv_dims(x, wq, ws, stride):
    b, cin, ha, wa, hb, wb = x.shape
    return (ctypes.c_int64 * 10)(b, cin, wq.shape[0], ha, wa, hb, wb, wq.shape[-1], ws.shape[-1], stride)


CONV_CASES = [
    # B, Cin, Cout, Ha, Wa, Hb, Wb, kq, ks, stride, bias
    (2, 3, 4, 5, 4, 7, 6, 3, 3, 2, True),
    (1, 2, 3, 3, 5, 7, 5, 5, 3, 3, False),
    (1, 18, 1, 3, 3, 4, 5, 3, 1, 1, True),  # Cin above the 16-channel weight tile; 1x1 support conv
]


@pytest.mark.parametrize("case,dtype", _cases(CONV_CASES, 0), ids=str)
def test_cp_conv4d_emulated(emu, case, dtype):
    b, cin, cout, ha, wa, hb, wb, kq, ks, stride, bias = case
    g = torch.Generator().manual_seed(1)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x = rnd(b, cin, ha, wa, hb, wb)
    wq, ws = rnd(cout, cin, kq, kq), rnd(cout, cin, ks, ks)
    bq, bs = (rnd(cout), rnd(cout)) if bias else (None, None)
    dims = _conv_dims(x, wq, ws, stride)
    dt = DTYPE_CODE[dtype]

    expect = ref.cp_conv4d(x, wq, bq, ws, bs, stride)
    out = torch.full(expect.shape, float("nan"), dtype=dtype)
    assert emu.emu_cp_conv4d_forward(dt, _p(x), _p(wq), _p(bq), _p(ws), _p(bs), _p(out), dims) == 0
    torch.testing.assert_close(out, expect, **_tols(dtype))

    leaves = [t.clone().requires_grad_() for t in (x, wq, ws)]
    bqr, bsr = (torch.zeros(cout, dtype=dtype, requires_grad=True), torch.zeros(cout, dtype=dtype, requires_grad=True))
    grad_out = rnd(*expect.shape)
    ref.cp_conv4d(leaves[0], leaves[1], bqr, leaves[2], bsr, stride).backward(grad_out)
    gx, gwq, gws = (torch.full_like(t, float("nan")) for t in (x, wq, ws))
    gb = torch.full((cout,), float("nan"), dtype=dtype)
    assert emu.emu_cp_conv4d_backward(dt, _p(grad_out), _p(x), _p(wq), _p(ws), _p(gx), _p(gwq), _p(gws), _p(gb),
                                      dims) == 0
    tol = _tols(dtype)
    torch.testing.assert_close(gx, leaves[0].grad, **tol)
    torch.testing.assert_close(gwq, leaves[1].grad, **tol)
    torch.testing.assert_close(gws, leaves[2].grad, **tol)
    torch.testing.assert_close(gb, bqr.grad, **tol)
    torch.testing.assert_close(gb, bsr.grad, **tol)

    # gradients not asked for: null pointers, nothing written
    gx2 = torch.full_like(x, float("nan"))
    assert emu.emu_cp_conv4d_backward(dt, _p(grad_out), _p(x), _p(wq), _p(ws), _p(gx2), None, None, None, dims) == 0
    torch.testing.assert_close(gx2, gx)


# ---- Sinkhorn ----
def _sinkhorn_problem(bsz, n, m, dtype, seed, zero_mass):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(bsz, n, m, generator=g, dtype=torch.float64)
    a = torch.rand(bsz, n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(bsz, m, generator=g, dtype=torch.float64) + 0.2
    if zero_mass:
        a[0, 1] = 0  # a zero-mass row and column in problem 0
        b[0, m - 1] = 0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return cost.to(dtype), a.to(dtype), b.to(dtype)


def emu_sinkhorn(lib, cost, a, b, eps, max_iter, tol, check_every, streamed):
    bsz, n, m = cost.shape
    dt = DTYPE_CODE[cost.dtype]
    plan = torch.full_like(cost, float("nan"))
    f = torch.full((bsz, n), float("nan"), dtype=cost.dtype)
    g = torch.full((bsz, m), float("nan"), dtype=cost.dtype)
    n_iter = torch.full((bsz,), -1, dtype=torch.int64)
    conv = torch.zeros(bsz, dtype=torch.bool)
    work = _work(lib.emu_sinkhorn_workspace(dt, *_i(bsz, n, m)))
    rc = lib.emu_sinkhorn_forward(dt, _p(cost), _p(a), _p(b), _p(plan), _p(f), _p(g), _p(n_iter), _p(conv), _p(work),
                                  *_i(bsz, n, m), ctypes.c_double(eps), ctypes.c_int64(max_iter),
                                  ctypes.c_double(tol), ctypes.c_int64(check_every), ctypes.c_int(streamed))
    assert rc == 0
    return ref.SinkhornResult(plan, f, g, n_iter, conv)


SINKHORN_CASES = [
    # B, N, M, eps, max_iter, tol, check_every, zero_mass
    (3, 5, 7, 0.3, 200, 1e-6, 3, True),
    (2, 6, 4, 0.05, 12, 1e-9, 5, False),  # stops at max_iter unconverged (checked at 5, 10 and 12)
    (1, 40, 33, 0.5, 100, 1e-5, 4, True),  # rows and columns wider than a warp
]
SINKHORN_HALF_CASE = (2, 5, 7, 0.3, 40, 1e-4, 4, True)


@pytest.mark.parametrize(
    "case,dtype,streamed",  # 16-bit types only through the shared-memory kernel (same code path otherwise)
    [(c, d, st) for c, d in _cases(SINKHORN_CASES, SINKHORN_HALF_CASE) for st in (0, 1) if st == 0 or d not in HALF],
    ids=lambda v: {0: "smem", 1: "streamed"}.get(v, str(v)) if isinstance(v, int) else str(v),
)
def test_sinkhorn_forward_emulated(emu, case, dtype, streamed):
    bsz, n, m, eps, max_iter, tol, check_every, zero_mass = case
    cost, a, b = _sinkhorn_problem(bsz, n, m, dtype, 2, zero_mass)
    expect = ref.sinkhorn(cost, a, b, eps, max_iter, tol, check_every)
    got = emu_sinkhorn(emu, cost, a, b, eps, max_iter, tol, check_every, streamed)
    assert not got.plan.isnan().any() and not got.f.isnan().any() and not got.g.isnan().any()
    assert torch.equal(got.n_iter, expect.n_iter)
    assert torch.equal(got.converged, expect.converged)
    tol_ = dict(rtol=1e-3, atol=1e-5) if dtype == torch.float32 else _tols(dtype)
    torch.testing.assert_close(got.plan, expect.plan, **tol_)
    torch.testing.assert_close(got.f, expect.f, **tol_)  # -inf where the mass is zero, in both
    torch.testing.assert_close(got.g, expect.g, **tol_)
    if zero_mass:
        assert (got.plan[0, 1] == 0).all() and (got.plan[0, :, m - 1] == 0).all()


@pytest.mark.parametrize("shape,dtype", _cases([(3, 5, 7), (1, 40, 33)], 0), ids=str)
def test_sinkhorn_backward_emulated(emu, shape, dtype):
    bsz, n, m = shape
    cost, a, b = _sinkhorn_problem(bsz, n, m, torch.float64, 3, True)
    eps = 0.3
    plan = ref.sinkhorn(cost, a, b, eps, 2000, 1e-12, 10).plan.to(dtype)
    grad_plan = torch.randn(plan.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    e_cost, e_a, e_b = ref.sinkhorn_implicit_grad(grad_plan, plan, eps)

    dt, acc = DTYPE_CODE[dtype], _acc(dtype)
    schur = torch.full((bsz, m, m), float("nan"), dtype=acc)
    rhs = torch.full((bsz, m), float("nan"), dtype=acc)
    work = _work(emu.emu_sinkhorn_backward_workspace(dt, *_i(bsz, n, m)))
    assert emu.emu_sinkhorn_backward_prepare(dt, _p(grad_plan), _p(plan), _p(schur), _p(rhs), _p(work),
                                             *_i(bsz, n, m), ctypes.c_double(eps)) == 0
    y = torch.linalg.solve(schur, rhs.unsqueeze(2)).squeeze(2).contiguous()  # what the binding does
    gc = torch.full_like(plan, float("nan"))
    ga = torch.full((bsz, n), float("nan"), dtype=dtype)
    gb = torch.full((bsz, m), float("nan"), dtype=dtype)
    assert emu.emu_sinkhorn_backward_finish(dt, _p(grad_plan), _p(plan), _p(y), _p(work), _p(gc), _p(ga), _p(gb),
                                            *_i(bsz, n, m), ctypes.c_double(eps)) == 0
    tol = dict(rtol=2e-3, atol=1e-4) if dtype == torch.float32 else _tols(dtype)
    torch.testing.assert_close(gc, e_cost, **tol)
    torch.testing.assert_close(ga, e_a, **tol)
    torch.testing.assert_close(gb, e_b, **tol)
    assert (gc[0, 1] == 0).all() and (gc[0, :, m - 1] == 0).all()


def test_cuda_levels_claimed():
    from tlg.ops import _native

    assert set(_native.CUDA_LEVELS) == {"correlation", "cp_conv4d", "sinkhorn"}
    assert all(v in ("emulation-verified", "compiled-only") for v in _native.CUDA_LEVELS.values())


# nvcc results last: the compiles started with the module and ran beside the emulation tests.
@pytest.mark.parametrize("src", KERNEL_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(src, nvcc_jobs, request, capsys):
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA kernels are not compiled on this machine")
    cmd, proc = nvcc_jobs[src]
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{log}"
    table = _resource_table(log)
    assert table, "no ptxas resource usage in the nvcc output"
    # Full table in a report section (pytest -rP); a one-line summary straight to the terminal.
    request.node.add_report_section("call", "resource usage", table)
    regs = [int(m) for m in re.findall(r"regs +(\d+)", table)]
    smem = [int(m) for m in re.findall(r"smem +(\d+)", table)]
    spills = [ln for ln in table.splitlines() if "spill 0/0" not in ln]
    with capsys.disabled():
        print(f"\n[nvcc {src.name}] {len(regs)} kernels (sm_80+sm_90): registers <= {max(regs)}, static smem <= "
              f"{max(smem)} B, {len(spills)} with spills" + "".join(f"\n    {ln}" for ln in spills))


def test_binding_type_checks(nvcc_jobs):
    """binding.cpp cannot be built without a CUDA torch; it is type-checked against the headers."""
    if "binding" not in nvcc_jobs:
        pytest.skip("needs a C++ compiler, the CUDA toolkit headers and torch's c10/cuda headers")
    cmd, proc = nvcc_jobs["binding"]
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{log[-4000:]}"
