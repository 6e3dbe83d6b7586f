"""Compile every kernel to PTX for Ampere (sm_80) and Hopper (sm_90) without a GPU.

``python -m tlgkernels.compile_check [--quick]`` (with ``TRITON_INTERPRET`` unset) runs Triton's
full compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin via the bundled ptxas) for float32, float16
and bfloat16, with the first autotune configuration on sm_80 and the last on sm_90. It proves the
kernels compile for those targets; it says nothing about their results on a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import correlation as corr
from . import cp_conv4d as conv
from . import sinkhorn as sk

FLOAT_ARGS = {"eps", "tol", "inv_m"}
TL = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}

# kernel, pointer types ("x" = the input dtype), constexprs (block sizes come from the autotune
# configs when the kernel is autotuned)
CASES = [
    ("corr.scale", corr._scale_kernel, dict(x_ptr="x"), dict(HAS_MASK=True, BLOCK_C=32, BLOCK_P=128)),
    ("corr.forward", corr._corr_kernel, dict(q_ptr="x", s_ptr="x", out_ptr="x"), {}),
    ("corr.gate", corr._gate_kernel, dict(g_ptr="x", c_ptr="x"), dict(BLOCK_M=64, BLOCK_N=64)),
    ("corr.grad_gemm", corr._grad_kernel, dict(x_ptr="x", y_ptr="x", out_ptr="x"), {}),
    ("conv.forward", conv._forward_kernel, dict(x_ptr="x", w_ptr="x", y_ptr="x"),
     dict(HAS_BIAS=True, S=2, KQ=5, KS=3)),
    ("conv.grad_x", conv._grad_x_kernel, dict(gy_ptr="x", w_ptr="x", gx_ptr="x"), dict(S=4, KQ=3, KS=5)),
    ("conv.grad_w", conv._grad_w_kernel, dict(gy_ptr="x", x_ptr="x", gw_ptr="x"), dict(S=2, KQ=3, KS=3)),
    ("conv.grad_bias", conv._grad_bias_kernel, dict(gy_ptr="x", gb_ptr="x"), dict(BLOCK=1024)),
    ("sinkhorn.small", sk._sinkhorn_small_kernel,
     dict(c_ptr="x", a_ptr="x", b_ptr="x", plan_ptr="x", n_iter_ptr="i64", conv_ptr="i8"),
     dict(BLOCK_N=64, BLOCK_M=64)),
    ("sinkhorn.stream", sk._sinkhorn_stream_kernel,
     dict(c_ptr="x", a_ptr="x", b_ptr="x", plan_ptr="x", n_iter_ptr="i64", conv_ptr="i8"),
     dict(BLOCK_N=64, BLOCK_M=64)),
    ("sinkhorn.plan_sums", sk._plan_sums_kernel, dict(p_ptr="x", gr_ptr="x"),
     dict(HAS_W=True, BLOCK_R=32, BLOCK_K=128)),
    ("sinkhorn.schur", sk._schur_kernel, dict(p_ptr="x"), {}),
    ("sinkhorn.grad_cost", sk._grad_cost_kernel, dict(p_ptr="x", gr_ptr="x", gc_ptr="x", ga_ptr="x"),
     dict(BLOCK_R=32, BLOCK_K=128)),
]


def _signature(fn, ptrs, consts, dtype):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = ptrs.get(name, "fp32")
            sig[name] = "*" + (TL[dtype] if kind == "x" else kind)
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def check(quick: bool = False) -> int:
    failures = 0
    dtypes = ["fp16"] if quick else ["fp32", "fp16", "bf16"]
    archs = [90] if quick else [80, 90]
    for label, kernel, ptrs, consts in CASES:
        configs = getattr(kernel, "configs", None)
        fn = kernel.fn if configs else kernel  # an Autotuner wraps the JITFunction
        for arch in archs:
            options = {"num_warps": 4, "num_stages": 3}
            full = dict(consts)
            if configs:  # Ampere: the first configuration; Hopper: the last
                cfg = configs[0] if arch == 80 else configs[-1]
                full.update(cfg.kwargs)
                options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            if "DOT_PRECISION" in fn.arg_names:
                full["DOT_PRECISION"] = "tf32"
            for dtype in dtypes:
                t0 = time.time()
                try:
                    src = ASTSource(fn, _signature(fn, ptrs, full, dtype), full)
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                    status = f"ok  ptx {len(compiled.asm['ptx']) // 1024} KiB"
                except Exception as exc:  # report every failure, keep going
                    failures += 1
                    status = f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(f"{label:<20} sm_{arch} {dtype}: {status} ({time.time() - t0:.1f}s)", flush=True)
    return failures


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="float16 on sm_90 only")
    failures = check(parser.parse_args().quick)
    print("all kernels compiled" if not failures else f"{failures} compilations failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
