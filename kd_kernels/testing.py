"""Helpers for tests and benchmarks: comparisons that explain their failures, and the
dtype tolerances of the project (CONVENTIONS.md §7)."""

from __future__ import annotations

import torch

# ------------------------------------------------------------------------- tolerance table
# (rtol, atol) for comparing a kernel's output in this dtype against the float64 reference,
# one table for every backend (CONVENTIONS.md §7):
# * float32: near 1e-5 relative. Holds for every backend: the PyTorch path is fp32, the Triton
#   and CUDA C++ kernels use fp32-faithful 3xTF32 on a GPU and fp32 "ieee" dots under the
#   interpreter (docs/precision.md).
# * float64: the ops route float64 to the PyTorch path whatever ``backend=`` says
#   (docs/precision.md), so every backend is held to float64 accuracy.
# * float16 / bfloat16: the 2x rule (``assert_close_2x``: at most twice the error of plain
#   PyTorch in that dtype, plus the final rounding ``low_precision_floor``); these entries are
#   the fallback where no same-dtype PyTorch yardstick exists (e.g. it is NaN).
TOLERANCES = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 1e-6),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),
}
#: (dtype, backend) -> (rtol, atol) where a backend needs other bounds than TOLERANCES; every
#: entry carries its why-comment. Empty: every backend meets the common table today.
BACKEND_TOLERANCES: dict[tuple[torch.dtype, str], tuple[float, float]] = {}


def tolerance(dtype: torch.dtype, backend: str = "torch") -> tuple[float, float]:
    """``(rtol, atol)`` of the tolerance table for a result in ``dtype`` from ``backend``."""
    return BACKEND_TOLERANCES.get((dtype, backend), TOLERANCES[dtype])


def low_precision_floor(dtype: torch.dtype) -> float:
    """Half an ulp at 1 in ``dtype`` (4.9e-4 fp16, 3.9e-3 bf16; 0 for fp32/fp64): the relative
    error of rounding an exact result to ``dtype``, which no kernel can avoid. Times the largest
    reference magnitude it is the 2x rule's floor."""
    return torch.finfo(dtype).eps / 2 if dtype in (torch.float16, torch.bfloat16) else 0.0


def error_report(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> str:
    """Max/mean absolute and relative error and the mismatch count, as one line."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        return f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}"
    diff = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = ~(diff <= tol)  # NaN counts as bad
    rel = diff / e.abs().clamp_min(1e-300)
    n = max(diff.numel(), 1)
    return (
        f"max abs err {diff.max().item() if diff.numel() else 0:.3e}, mean abs err "
        f"{diff.sum().item() / n:.3e}, max rel err {rel.max().item() if rel.numel() else 0:.3e}, "
        f"mismatches {int(bad.sum())}/{diff.numel()} (rtol={rtol:g}, atol={atol:g})"
    )


def assert_close(actual, expected, *, rtol: float | None = None, atol: float | None = None, name: str = "value"):
    """Assert ``|actual - expected| <= atol + rtol*|expected|`` elementwise (NaN fails).

    Tolerances default to ``TOLERANCES[actual.dtype]``. The failure message carries the
    max/mean error and the mismatch count.
    """
    if expected is None or actual is None:
        assert actual is None and expected is None, (
            f"{name}: one of actual/expected is None ({actual is None}, {expected is None})"
        )
        return
    d_rtol, d_atol = TOLERANCES.get(actual.dtype, (1e-5, 1e-6))
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    ok = bool(((a - e).abs() <= atol + rtol * e.abs()).all())
    assert ok, f"{name}: {error_report(a, e, rtol, atol)}"


def assert_close_2x(actual, expected, baseline, *, name: str = "value", floor: float = 1e-6):
    """The low-precision rule: the kernel's max error against the float64 ``expected`` may
    be at most 2x the error of ``baseline`` (plain PyTorch in the same dtype), plus ``floor``."""
    e = expected.detach().to(torch.float64).cpu()
    err = (actual.detach().to(torch.float64).cpu() - e).abs().max().item()
    base = (baseline.detach().to(torch.float64).cpu() - e).abs().max().item()
    assert err <= 2 * base + floor, f"{name}: max err {err:.3e} > 2 x baseline err {base:.3e} + {floor:g}"


def value_and_grads(fn, student: torch.Tensor, teacher: torch.Tensor, *, grad_output=None, dtype=None, **kwargs):
    """Run ``fn(student, teacher, **kwargs)`` on fresh leaf copies and backpropagate.

    ``student`` always gets a gradient; ``teacher`` gets one only when the given tensor has
    ``requires_grad``. ``grad_output`` (default: ones) seeds the backward, so a test can use a
    value other than 1 and the ``reduction="none"`` shape. ``dtype`` casts both inputs first
    (e.g. ``torch.float64`` for the oracle). Returns ``(value, grad_student, grad_teacher)``;
    ``grad_teacher`` is ``None`` when the teacher did not require grad.
    """
    s = student.detach().to(dtype or student.dtype).requires_grad_(True)
    t = teacher.detach().to(dtype or teacher.dtype).requires_grad_(teacher.requires_grad)
    out = fn(s, t, **kwargs)
    g = torch.ones_like(out) if grad_output is None else grad_output.to(device=out.device, dtype=out.dtype)
    out.backward(g)
    return out.detach(), s.grad, t.grad


def assert_matches_reference(
    fn, ref, student, teacher, *, grad_output=None, rtol=None, atol=None, name="loss", backend=None, **kwargs
):
    """Compare ``fn`` (in the inputs' dtype) with ``ref`` in float64: value and both gradients.

    With ``backend``, ``fn`` is called with ``backend=backend`` and the default tolerances are
    ``tolerance(student.dtype, backend)``.
    """
    if backend is not None:
        public = fn

        def fn(a, b, **kw):
            return public(a, b, backend=backend, **kw)

        d_rtol, d_atol = tolerance(student.dtype, backend)
        rtol = d_rtol if rtol is None else rtol
        atol = d_atol if atol is None else atol
    v, gs, gt = value_and_grads(fn, student, teacher, grad_output=grad_output, **kwargs)
    rv, rgs, rgt = value_and_grads(ref, student, teacher, grad_output=grad_output, dtype=torch.float64, **kwargs)
    assert v.dtype == student.dtype, f"{name}: result dtype {v.dtype} != student dtype {student.dtype}"
    assert v.device == student.device, f"{name}: result on {v.device}, inputs on {student.device}"
    assert_close(v, rv, rtol=rtol, atol=atol, name=f"{name} value")
    assert_close(gs, rgs, rtol=rtol, atol=atol, name=f"{name} grad student")
    assert_close(gt, rgt, rtol=rtol, atol=atol, name=f"{name} grad teacher")


# ------------------------------------------------------------------------- backend matrix
#: Every kernel backend a test may run through (the ``backend`` fixture of tests/conftest.py).
BACKENDS = ("torch", "triton", "cuda")


def backend_skip_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine (``None`` when it can)."""
    from kd_kernels._backend import TRITON_INTERPRET, extension_status, load_extension, triton_version

    if backend == "torch":
        return None
    if backend == "triton":
        if triton_version() is None:
            return "triton is not installed"
        if not (TRITON_INTERPRET or torch.cuda.is_available()):
            return "Triton needs a CUDA device or TRITON_INTERPRET=1"
        return None
    if backend == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device (the CUDA C++ kernels need one)"
        return None if load_extension() is not None else f"kd_kernels._C is not available: {extension_status()}"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def backend_device(backend: str) -> torch.device:
    """The device a test runs ``backend`` on: CUDA when a GPU is present (and always for
    ``cuda``), else the CPU (torch, and triton under the interpreter)."""
    from kd_kernels._backend import TRITON_INTERPRET

    if backend == "cuda" or (torch.cuda.is_available() and not (backend == "triton" and TRITON_INTERPRET)):
        return torch.device("cuda")
    return torch.device("cpu")


def loss_kernels() -> dict[str, tuple[str, ...]]:
    """Every public loss -> the backends it has kernels for (each family module's ``_KERNELS``)."""
    from kd_kernels import losses

    out: dict[str, tuple[str, ...]] = {}
    for module in (losses.rkd, losses.geometry, losses.sinkhorn, losses.logit, losses.fused_linear):
        kernels: dict = module._KERNELS  # public loss name -> backends
        out.update((loss, tuple(b)) for loss, b in kernels.items())
    return out


def implemented_backends(loss: str) -> tuple[str, ...]:
    """The backends public loss ``loss`` (e.g. ``"rkd_distance_loss"``) has kernels for."""
    kernels = loss_kernels()
    if loss not in kernels:
        raise ValueError(f"unknown loss {loss!r}")
    return kernels[loss]


def require(backend: str, loss: str) -> torch.device:
    """Skip the calling test when ``loss`` has no ``backend`` kernel; else return the device
    to run it on (see :func:`backend_device`)."""
    import pytest

    if backend not in implemented_backends(loss):
        pytest.skip(f"{loss} has no {backend!r} kernel yet (implemented: {implemented_backends(loss)})")
    return backend_device(backend)


def require_extension():
    """``kd_kernels._C``, or skip the calling test with the reason it is not available."""
    import pytest

    from kd_kernels._backend import extension_status, load_extension

    ext = load_extension()
    if ext is None:
        pytest.skip(f"kd_kernels._C not built: {extension_status()}")
    return ext
