"""Shared switches of the Triton kernels.

``INTERPRET`` is read once, when this package is imported: Triton's interpreter
(``TRITON_INTERPRET=1``) must be on before any kernel is defined. Under the interpreter every
kernel runs with a single configuration (autotuning would only time numpy); on a GPU the
autotuner chooses among configurations sized for Ampere (sm_80/86) and Hopper (sm_90).
"""
from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(gpu: list[triton.Config], interpret: triton.Config) -> list[triton.Config]:
    """The autotune list: ``gpu`` normally, the single ``interpret`` config under the interpreter."""
    return [interpret] if INTERPRET else gpu


def _cfg(m: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Ampere: up to 164 KiB of shared memory, 3-4 stages;
# Hopper: 228 KiB, so larger tiles with deeper pipelines and 8 warps. Configurations that do not
# fit a given dtype are dropped by the autotuner (out of resources).
GEMM_GPU = [_cfg(64, 64, 32, 4, 3), _cfg(128, 64, 32, 4, 3), _cfg(64, 128, 32, 4, 4), _cfg(128, 128, 32, 8, 3),
            _cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 4)]  # last two: Hopper
# Implicit-GEMM convolutions: few configurations (each (stride, kernel) pair compiles its own set);
# the thin one for the few-channel first layers of the 4D encoder (Cin = 3..6).
CONV_GPU = [_cfg(128, 32, 16, 4, 3), _cfg(128, 64, 32, 4, 3), _cfg(128, 128, 32, 8, 3)]


def gemm_configs(interpret_m: int = 16, interpret_n: int = 16, interpret_k: int = 16,
                 gpu: list[triton.Config] = GEMM_GPU) -> list[triton.Config]:
    """Autotune list of a GEMM-shaped kernel: ``gpu``, or one config of the given tile under the interpreter."""
    return configs(gpu, _cfg(interpret_m, interpret_n, interpret_k, 1, 1))


def fp32_dot_precision() -> str:
    """``tl.dot`` precision for float32 inputs: TF32 only where torch itself allows it for matmuls."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def supported_dtype(t: torch.Tensor) -> None:
    """float32 and float16 everywhere, bfloat16 on a GPU only (the interpreter's numpy has none);
    float32 accumulation in every kernel."""
    ok = [torch.float32, torch.float16]
    if t.device.type == "cuda" and not INTERPRET:
        ok.append(torch.bfloat16)
    if t.dtype not in ok:
        raise TypeError(f"tlgkernels: {t.dtype} is not supported on {t.device.type} here (supported: {ok})")
