"""Backend selection, the lazily loaded compiled extension, and build information.

Every public loss resolves its ``backend=`` argument here, once, before it calls its
custom op. The resolved name ("torch", "triton" or "cuda") is passed to the op as a
string argument, so the op's device implementations know which kernel to run and
``torch.compile`` sees a constant.

Nothing in this module compiles code, touches a GPU or imports Triton at import time.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")

# Read once: the Triton interpreter must be chosen before triton is imported anyway.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_ext_state: dict[str, object] = {}
_triton_state: dict[str, object] = {}


EXTENSION_NOT_BUILT = "not built (pure-Python install)"


def load_extension():
    """Import ``kd_kernels._C`` once; return the module or ``None`` (reason in build_info).

    An absent ``_C`` (a pure-Python install: ``KD_KERNELS_BUILD_CUDA=0``, or no CUDA toolkit at
    build time) is not an error: ``extension_error()`` is then ``None`` and
    ``extension_status()`` says ``"not built (pure-Python install)"``. A ``_C`` that exists but
    fails to import (e.g. built against another torch) is an error.
    """
    if "module" not in _ext_state:
        try:
            _ext_state["module"] = importlib.import_module("kd_kernels._C")
            _ext_state["error"] = None
        except ModuleNotFoundError as exc:
            _ext_state["module"] = None
            # kd_kernels._C itself is absent: not built, on purpose. Anything else it imports is missing: an error.
            _ext_state["error"] = None if exc.name == "kd_kernels._C" else f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001  (ImportError, or an undefined symbol from a torch mismatch)
            _ext_state["module"] = None
            _ext_state["error"] = f"{type(exc).__name__}: {exc}"
    return _ext_state["module"]


def extension_error() -> str | None:
    """Why ``kd_kernels._C`` failed to load; ``None`` when it loaded or was not built (see ``extension_status``)."""
    load_extension()
    return _ext_state["error"]  # type: ignore[return-value]


def extension_status() -> str:
    """``"loaded"``, ``"not built (pure-Python install)"`` or ``"failed to load: <error>"``."""
    if load_extension() is not None:
        return "loaded"
    error = _ext_state["error"]
    return EXTENSION_NOT_BUILT if error is None else f"failed to load: {error}"


def triton_version() -> str | None:
    """The installed Triton's version, or ``None``; imports Triton on first call only."""
    if "version" not in _triton_state:
        try:
            import triton

            _triton_state["version"] = triton.__version__
        except Exception:  # noqa: BLE001  (a broken triton install must not break import)
            _triton_state["version"] = None
    return _triton_state["version"]  # type: ignore[return-value]


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return triton_version() is not None
    return TRITON_INTERPRET and triton_version() is not None


def _cuda_usable(device: torch.device) -> bool:
    return device.type == "cuda" and load_extension() is not None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` in this installation.

    Args:
        device: a ``torch.device`` or string such as ``"cpu"`` or ``"cuda:0"``; default CPU.

    Returns:
        A list drawn from ``["cuda", "triton", "torch"]``, fastest first. ``"torch"`` is
        always present. ``"triton"`` appears on CPU only when ``TRITON_INTERPRET=1``.
        ``"cuda"`` needs a CUDA device and the compiled extension ``kd_kernels._C``. For a
        CUDA device on a machine where ``torch.cuda.is_available()`` is False (no GPU or no
        driver), neither GPU backend is listed.
        (Individual losses may not have every kernel yet; asking a loss for a kernel it
        lacks raises a ``ValueError`` that says so.)
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return ["torch"]
    out = []
    if _cuda_usable(device):
        out.append("cuda")
    if _triton_usable(device):
        out.append("triton")
    out.append("torch")
    return out


def resolve_backend(backend: str, device: torch.device, *, loss: str, kernels: Iterable[str]) -> str:
    """Turn the user's ``backend=`` into the concrete kernel to run.

    Args:
        backend: one of ``"auto" | "cuda" | "triton" | "torch"``.
        device: the device of the inputs.
        loss: public name of the loss, for error messages.
        kernels: the backends this loss implements (always includes ``"torch"``).

    ``"auto"`` picks the first of ``cuda``, ``triton`` that the loss implements and that
    can run on ``device`` (GPU only; on CPU it is always ``"torch"``), else ``"torch"``.
    Forcing a backend that cannot run raises ``ValueError`` naming what is missing.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{loss}: backend must be one of {BACKENDS}, got {backend!r}")
    kernels = tuple(kernels)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type == "cuda":
            if "cuda" in kernels and _cuda_usable(device):
                return "cuda"
            if "triton" in kernels and _triton_usable(device):
                return "triton"
        return "torch"
    if backend not in kernels:
        raise ValueError(f"{loss}: backend={backend!r} is not implemented for this loss yet; implemented: {kernels}")
    if backend == "triton" and not _triton_usable(device):
        if triton_version() is None:
            why = "triton is not installed"
        else:
            why = f"tensors are on {device.type}; Triton needs a CUDA device or TRITON_INTERPRET=1"
        raise ValueError(f"{loss}: backend='triton' is not available: {why}")
    if backend == "cuda" and not _cuda_usable(device):
        if device.type != "cuda":
            why = f"tensors are on {device.type}, the CUDA C++ kernels need CUDA tensors"
        else:
            why = f"the compiled extension kd_kernels._C is not available ({extension_status()})"
        raise ValueError(f"{loss}: backend='cuda' is not available: {why}")
    return backend


def fp32_dot_precision() -> str:
    """How float32 matrix products run in the kernels (docs/precision.md), read at call time.

    ``"tf32"`` when PyTorch's own switch allows TF32 (``torch.backends.cuda.matmul.allow_tf32``
    or ``torch.get_float32_matmul_precision() != "highest"``), else ``"tf32x3"`` (fp32-faithful).
    """
    allow = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allow else "tf32x3"


def build_info() -> dict:
    """Versions and build facts: kd_kernels, torch, triton, CUDA, and the extension.

    Returns a dict with keys ``version``, ``torch``, ``torch_cuda``, ``triton``,
    ``triton_interpret``, ``extension_loaded``, ``extension_status`` (``"loaded"``,
    ``"not built (pure-Python install)"`` or ``"failed to load: ..."``), ``extension_error``
    (why an existing ``_C`` failed to import; ``None`` when it loaded or was not built) and,
    when the extension loaded, ``extension`` (what ``_C.build_info()`` reports: the CUDA
    toolkit, architectures and the compiled ops).
    """
    from kd_kernels import __version__

    ext = load_extension()
    info = {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version(),
        "triton_interpret": TRITON_INTERPRET,
        "extension_loaded": ext is not None,
        "extension_status": extension_status(),
        "extension_error": extension_error(),
    }
    if ext is not None:
        info["extension"] = dict(ext.build_info())
    return info
