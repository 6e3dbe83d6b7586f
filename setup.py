"""Build tlg._C: the C++/OpenMP kernels always; the CUDA kernels when torch has CUDA and nvcc exists.

Environment:
  TLG_NATIVE_ARCH=1   add -march=native (off by default: wheels stay portable)
  TLG_NO_EXTENSION=1  skip the extension entirely (pure-Python install; tlg falls back to the reference)
  TLG_FORCE_CUDA=1    build the CUDA sources even when no GPU is visible (needs a CUDA torch and nvcc)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("TLG_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("tlg: torch is not installed; building without the native extension", file=sys.stderr)
        return [], {}

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++17"]
    if os.environ.get("TLG_NATIVE_ARCH") == "1":
        cxx.append("-march=native")
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
    macros = []
    with_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda and (torch.cuda.is_available() or os.environ.get("TLG_FORCE_CUDA") == "1"
                      or os.environ.get("TORCH_CUDA_ARCH_LIST")):
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        macros.append(("TLG_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": nvcc}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}
    ext = ext_cls(
        name="tlg._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
