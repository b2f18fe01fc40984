"""The build: one source list for setup.py and CMake, version, lazy import, build_info, and the
compiled extension's functions (plain pybind11 functions of kd_kernels._C, no torch.library ops:
the custom ops of kd_kernels/ops/ call them; their fakes are tested with the ops).

Everything here runs without a GPU. The tests of the compiled library skip, with the import
error, when ``kd_kernels._C`` was not built.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kd_kernels
from kd_kernels._backend import extension_status, load_extension

ROOT = Path(__file__).resolve().parent.parent

_ext = load_extension()

# The functions kd_kernels._C provides (csrc/include/kd_ops.h, bound in csrc/kd_kernels.cpp), in
# binding order: the contract the ops of kd_kernels/ops/ code against.
EXT_FUNCTIONS = (
    "kd_fwd_cuda",
    "kd_bwd_cuda",
    "divergence_fwd_cuda",
    "divergence_bwd_cuda",
    "divergence_cpu_supported",
    "divergence_cpu_isa",
    "divergence_fwd_cpu",
    "divergence_bwd_cpu",
    "rkd_distance_fwd_cuda",
    "rkd_distance_bwd_cuda",
    "rkd_angle_fwd_cuda",
    "rkd_angle_bwd_cuda",
    "sinkhorn_fwd_cpu",
    "geometry_products_cuda",
    "geometry_grad_cuda",
    "geometry_row_sq_cuda",
    "sinkhorn_fwd_cuda",
    "sinkhorn_bwd_cuda",
    "sinkhorn_loss_fwd_cuda",
    "sinkhorn_loss_bwd_cuda",
)
needs_ext = pytest.mark.skipif(_ext is None, reason=f"kd_kernels._C not built: {extension_status()}")


def _setup_module() -> dict:
    """setup.py's globals, without running setup() (it only runs as __main__)."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="kd_kernels_setup")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib (reading pyproject.toml) needs Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _cmake_sources() -> list[str]:
    """The sources CMakeLists.txt compiles: the list file it names, read with its own rules."""
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r'set\(_kd_source_list "\$\{PROJECT_SOURCE_DIR\}/([^"]+)"\)', text)
    assert m, "CMakeLists.txt must read its sources from a list file: set(_kd_source_list ...)"
    assert 'file(STRINGS "${_kd_source_list}"' in text
    # CMake: strip each line, drop empty lines and lines starting with '#'.
    lines = [line.strip() for line in (ROOT / m.group(1)).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_setup_and_cmake_compile_the_same_sources():
    setup_sources = _setup_module()["read_sources"]()
    assert setup_sources == _cmake_sources()
    assert setup_sources, "the source list is empty"
    for src in setup_sources:
        assert (ROOT / src).is_file(), f"listed source {src} does not exist"
    # Neither build file names a source itself (so the list file is the only place to edit).
    for build_file in ("CMakeLists.txt", "setup.py"):
        named = re.findall(r"[\w/]+\.(?:cu|cpp)\b", (ROOT / build_file).read_text())
        assert not named, f"{build_file} names sources directly: {named}"
    # Every C++/CUDA translation unit under csrc/ is built (a new .cu must be added to the list).
    on_disk = sorted(p.relative_to(ROOT).as_posix() for ext in ("*.cu", "*.cpp") for p in (ROOT / "csrc").rglob(ext))
    missing = sorted(set(on_disk) - set(setup_sources))
    assert not missing, f"add {missing} to csrc/sources.txt (one line each) so that setup.py and CMake build them"
    assert sorted(setup_sources) == on_disk


def test_version_matches_package():
    pyproject = _pyproject()
    project = pyproject["project"]
    assert project["name"] == "kd_kernels"
    assert "version" in project["dynamic"] and "version" not in project
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kd_kernels.__version__"}
    # setuptools reads the attribute statically: it must be a string literal in __init__.py.
    tree = ast.parse((ROOT / "kd_kernels" / "__init__.py").read_text())
    literal = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
        and isinstance(node.value, ast.Constant)
    ]
    assert literal == [kd_kernels.__version__]
    assert importlib.metadata.version("kd_kernels") == kd_kernels.__version__  # the installed metadata


def test_pyproject_contract():
    pyproject = _pyproject()
    project = pyproject["project"]
    assert project["requires-python"] == ">=3.10"
    assert "torch>=2.4" in project["dependencies"] and "numpy" in project["dependencies"]
    assert set(project["optional-dependencies"]["dev"]) >= {"pytest", "pytest-benchmark", "ninja", "pybind11", "ruff"}
    assert project["optional-dependencies"]["triton"] == ["triton"]
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["kd_kernels", "kd_kernels.*"]
    assert pyproject["tool"]["ruff"]["line-length"] == 120
    assert pyproject["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert any(m.startswith("gpu:") for m in pyproject["tool"]["pytest"]["ini_options"]["markers"])


def _run_setup(mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_KERNELS_BUILD_CUDA": mode}
    return subprocess.run(
        [sys.executable, "setup.py", "--version"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_setup_skip_says_why_and_bad_mode_fails():
    skipped = _run_setup("0")
    assert skipped.returncode == 0, skipped.stderr
    assert "not building the CUDA extension kd_kernels._C (KD_KERNELS_BUILD_CUDA=0)" in skipped.stdout
    assert skipped.stdout.strip().splitlines()[-1] == kd_kernels.__version__
    bad = _run_setup("maybe")
    assert bad.returncode != 0
    assert "KD_KERNELS_BUILD_CUDA must be auto, 0 or 1, got 'maybe'" in bad.stderr


def test_import_is_lazy():
    """`import kd_kernels` imports neither triton nor the extension and does not initialise CUDA."""
    code = (
        "import json, sys, torch, kd_kernels\n"
        "print(json.dumps({'triton': 'triton' in sys.modules, 'ext': 'kd_kernels._C' in sys.modules,"
        " 'cuda_initialized': torch.cuda.is_initialized()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"triton": False, "ext": False, "cuda_initialized": False}


def test_build_info_keys():
    info = kd_kernels.build_info()
    keys = {"version", "torch", "torch_cuda", "triton", "triton_interpret", "extension_loaded", "extension_error"}
    assert keys <= set(info)
    assert info["version"] == kd_kernels.__version__
    assert info["extension_loaded"] == (_ext is not None)
    # extension_error is None also for a pure-Python install (_C not built is not an error)
    assert (info["extension_status"] == "loaded") == (_ext is not None)
    assert (info["extension_error"] is None) == (_ext is not None or info["extension_status"].startswith("not built"))
    assert ("extension" in info) == (_ext is not None)
    json.dumps(info)  # plain data, printable by `make install`


@needs_ext
def test_extension_build_info():
    info = _ext.build_info()
    assert set(info) == {"cuda_version", "archs", "torch_version_at_build", "debug", "ops"}
    assert list(info["ops"]) == list(EXT_FUNCTIONS), "build_info()['ops'] lists the bound kernel functions"
    assert info["archs"] and all(re.fullmatch(r"\d+\.\d+[a-z]?(\+PTX)?", a) for a in info["archs"]), info["archs"]
    assert isinstance(info["debug"], bool)
    # The extension only loads under the torch it was built against (ABI): same version.
    assert torch.__version__.split("+")[0] == info["torch_version_at_build"]
    assert info["cuda_version"] // 1000 == int(torch.version.cuda.split(".")[0])
    assert kd_kernels.build_info()["extension"] == info


@needs_ext
@pytest.mark.parametrize("name", EXT_FUNCTIONS)
def test_extension_functions_are_plain_functions(name):
    """Each kernel is a plain pybind11 function of _C, not a torch.library op (no op inside an op)."""
    fn = getattr(_ext, name)
    assert callable(fn) and fn.__doc__
    try:  # a schema of that name may still exist in Python; _C must not give it a CUDA kernel
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"kd_kernels::{name}", "CUDA")
    except RuntimeError:  # no such op at all
        registered = False
    assert not registered


@needs_ext
def test_extension_functions_check_their_arguments():
    """CPU tensors, float64 RKD inputs and bad strings fail with a RuntimeError that names the function."""
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="kd_fwd_cuda: student must be a CUDA tensor"):
        _ext.kd_fwd_cuda(s, t, 2.0)
    row = torch.ones(3)
    with pytest.raises(RuntimeError, match="kd_bwd_cuda: student must be a CUDA tensor"):
        _ext.kd_bwd_cuda(row, s, t, row, row, 2.0)
    for name in ("rkd_distance_fwd_cuda", "rkd_angle_fwd_cuda"):
        with pytest.raises(RuntimeError, match=f"{name}: student must be a CUDA tensor"):
            getattr(_ext, name)(s, t, "mean", "tf32x3")
    with pytest.raises(RuntimeError, match="rkd_angle_bwd_cuda: student must be a CUDA tensor"):
        _ext.rkd_angle_bwd_cuda(torch.ones(()), s, t, "mean", True, False, "tf32x3")
    with pytest.raises(RuntimeError, match="rkd_distance_bwd_cuda: student must be a CUDA tensor"):
        _ext.rkd_distance_bwd_cuda(torch.ones(()), s, t, torch.ones(()), torch.ones(()), "mean", True, True, "tf32")
    with pytest.raises(TypeError):  # the signature is enforced by pybind11
        _ext.rkd_angle_fwd_cuda(s, t, "mean")
