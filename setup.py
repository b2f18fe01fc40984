"""Build script: the package metadata lives in pyproject.toml; this file adds the CUDA extension.

``kd_kernels._C`` (the CUDA C++ kernels, csrc/) is compiled with torch.utils.cpp_extension.
torch must already be installed: ``pip install --no-build-isolation -e .``

Environment (all optional):
  KD_KERNELS_BUILD_CUDA  auto (default): build when torch is a CUDA build and nvcc is found (no GPU
                         needed); 1: build or fail loudly; 0: never build (pure-Python install).
  KD_KERNELS_CUDA_ARCHS  compute capabilities, default "8.0;9.0+PTX" (A100, H100 + PTX for newer
                         GPUs); exported as TORCH_CUDA_ARCH_LIST, needed when no GPU is visible.
  KD_KERNELS_DEBUG       1: host -O0 -g, device -G (default: -O3, device -lineinfo for profilers).
  KD_KERNELS_PTXAS_VERBOSE  1: add -Xptxas -v to every nvcc invocation (registers, spills, smem per
                         kernel instantiation in the build log; read by benchmarks/compile_gate.py).
  CUDA_HOME / CUDA_PATH  the CUDA toolkit; default /usr/local/cuda, else the nvcc on PATH.
  MAX_JOBS               parallel compile jobs (default: the number of CPUs).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SOURCE_LIST = ROOT / "csrc" / "sources.txt"
DEFAULT_ARCHS = "8.0;9.0+PTX"


def read_sources() -> list[str]:
    """The extension's sources (repository-relative paths) from csrc/sources.txt, shared with CMakeLists.txt."""
    lines = (line.strip() for line in SOURCE_LIST.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root that has bin/nvcc: CUDA_HOME, CUDA_PATH, /usr/local/cuda, then nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return home
    return None


def _why_not_cuda() -> str | None:
    """None when the CUDA extension can be built here, else the reason it cannot."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable at build time ({exc}); install torch first and use --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if _find_cuda_home() is None:
        return "nvcc not found (set CUDA_HOME, or put nvcc on PATH)"
    return None


def _nvidia_include_dirs() -> list[str]:
    """Include dirs of the pip-installed CUDA libraries (nvidia/*/include: cusparse.h, cublas_v2.h, ...)
    that torch's ATen CUDA headers include; they are searched after the toolkit's own headers."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or spec.submodule_search_locations is None:
        return []
    return sorted(str(d) for loc in spec.submodule_search_locations for d in Path(loc).glob("*/include") if d.is_dir())


def _cuda_extension():
    """The CUDAExtension for kd_kernels._C and the BuildExtension command class."""
    os.environ["CUDA_HOME"] = _find_cuda_home()  # read by torch.utils.cpp_extension at import
    archs = os.environ.get("KD_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS).strip()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    debug = os.environ.get("KD_KERNELS_DEBUG", "0") == "1"

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # The arch list travels as a bare token sequence ("8.0:9.0+PTX"): no quotes or ';' to escape
    # through ninja's shell, no ',' (nvcc splits -D values on commas); the module init
    # stringifies it and splits it again (build_info()["archs"]).
    arch_token = ":".join(archs.replace(";", " ").split())
    macros = [f"-DKD_KERNELS_CUDA_ARCHS={arch_token}", f"-DKD_KERNELS_DEBUG={int(debug)}"]
    # No -std flag: torch.utils.cpp_extension adds the standard its own headers need (C++17 up to
    # torch 2.9, C++20 since); the sources are valid C++17. No --use_fast_math (accuracy).
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # The CPU kernels (csrc/cpu/) use at::parallel_for, whose OpenMP body is inlined from ATen's
    # headers, and `#pragma omp simd` loops: both need -fopenmp (libgomp.so.1 is torch's own,
    # already loaded, so there is one OpenMP runtime).
    cxx += ["-fopenmp"]
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
    if os.environ.get("KD_KERNELS_PTXAS_VERBOSE", "0") == "1":
        nvcc += ["-Xptxas", "-v"]
    ext = CUDAExtension(
        name="kd_kernels._C",
        sources=read_sources(),
        include_dirs=[str(ROOT / "csrc" / "include")],
        extra_compile_args={"cxx": cxx + macros, "nvcc": nvcc + macros},
        extra_link_args=["-fopenmp"],
    )
    ext.include_dirs += _nvidia_include_dirs()  # after torch's and the toolkit's include dirs
    return ext, BuildExtension.with_options(use_ninja=True)


def _extensions() -> tuple[list, dict]:
    mode = os.environ.get("KD_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"kd_kernels: KD_KERNELS_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    why = "KD_KERNELS_BUILD_CUDA=0" if mode == "0" else _why_not_cuda()
    if why is not None:
        if mode == "1":
            sys.exit(f"kd_kernels: KD_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
        print(f"kd_kernels: not building the CUDA extension kd_kernels._C ({why}); installing pure Python", flush=True)
        return [], {}
    ext, build_ext = _cuda_extension()
    print(f"kd_kernels: building kd_kernels._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return [ext], {"build_ext": build_ext}


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import read_sources
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
