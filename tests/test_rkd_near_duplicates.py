"""Near-duplicate and duplicate rows in fp32 (docs/rkd.md §4), on every backend, through the
public functions: values and gradients against float64 computed on the same fp32-rounded
inputs."""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels.reference import rkd as ref
from kd_kernels.testing import assert_close, require
from kd_kernels.torch_impl import rkd as impl

F64 = torch.float64
LOSSES = {
    "distance": ("rkd_distance_loss", ref.rkd_distance_loss),
    "angle": ("rkd_angle_loss", ref.rkd_angle_loss),
}
TOL = 1e-4


def _grad_output(kind, n, reduction):
    if reduction == "mean":
        return torch.tensor(0.73, dtype=F64)
    shape = (n, n) if kind == "distance" else (n,)
    return torch.rand(shape, dtype=F64) + 0.3


def _run(fn, s, t, go, dtype=None, **kw):
    """(value, grad student, grad teacher) of ``fn`` on leaf copies (cast to ``dtype``)."""
    s = s.detach().to(dtype or s.dtype).requires_grad_(True)
    t = t.detach().to(dtype or t.dtype).requires_grad_(True)
    out = fn(s, t, **kw)
    out.backward(go.to(out.dtype).to(out.device))
    return out.detach().cpu(), s.grad.cpu(), t.grad.cpu()


def _close(actual, expected, name):
    """Within TOL relative to the tensor's scale (max |expected|)."""
    scale = expected.abs().max().item()
    assert torch.isfinite(actual).all(), f"{name}: non-finite entries"
    assert_close(actual, expected, rtol=TOL, atol=TOL * scale + 1e-30, name=name)


def _public(kind, backend):
    name, rfn = LOSSES[kind]
    device = require(backend, name)
    fn = getattr(kd_kernels, name)

    def call(s, t, **kw):
        return fn(s.to(device), t.to(device), backend=backend, **kw)

    return call, rfn


def _near(x, i, j, rho):
    """Row j := row i + rho |x_i| u (u a random unit vector), rounded to fp32."""
    u = torch.randn(x.shape[1])
    x[j] = x[i] + rho * x[i].norm() * u / u.norm()


def _inputs(n, ds=20, dt=13, offset=0.0):
    s = torch.randn(n, ds) + offset
    t = torch.randn(n, dt) * 2 - 1
    return s, t


# (N, where the near pairs are, large common offset): N = 9 (one tile), 37 (tiles of 32 crossed)
CASES = [(9, "student", 0.0), (37, "teacher", 0.0), (37, "both", 0.0), (9, "both", 50.0), (37, "student", 20.0)]


@pytest.mark.parametrize("rho", [1e-1, 1e-2, 1e-3, 2e-4, 1e-5, 1e-6])
@pytest.mark.parametrize("n,where,offset", CASES)
@pytest.mark.parametrize("kind", ["distance", "angle"])
def test_near_pairs(backend, kind, n, where, offset, rho):
    if backend == "triton" and (n, where, offset) != (37, "both", 0.0):
        pytest.skip("triton runs under the interpreter here: one shape per separation")
    fn, rfn = _public(kind, backend)
    s, t = _inputs(n, offset=offset)
    for x, on in ((s, where in ("student", "both")), (t, where in ("teacher", "both"))):
        if on:
            _near(x, 3, 5, rho)
            _near(x, 1, n - 1, rho)  # a pair across tiles for n = 37
            _near(x, n - 1, n - 2, rho)  # a chain of three near rows
    for reduction in ("mean", "none"):
        go = _grad_output(kind, n, reduction)
        v, gs, gt = _run(fn, s, t, go, reduction=reduction)
        rv, rgs, rgt = _run(rfn, s, t, go, dtype=F64, reduction=reduction)
        tag = f"{kind} {reduction} rho={rho:g}"
        _close(v, rv, f"{tag} value")
        _close(gs, rgs, f"{tag} grad student")
        _close(gt, rgt, f"{tag} grad teacher")


@pytest.mark.parametrize("n", [9, 37])
@pytest.mark.parametrize("kind", ["distance", "angle"])
def test_exact_duplicates_in_both(backend, kind, n):
    """The same sample twice (in both networks): value and gradients are the reference's."""
    if backend == "triton" and n == 9:
        pytest.skip("triton under the interpreter: one shape")
    fn, rfn = _public(kind, backend)
    s, t = _inputs(n, offset=3.0)
    for i, j in ((2, 6), (0, n - 1), (4, n - 3)):
        s[j], t[j] = s[i], t[i]
    for reduction in ("mean", "none"):
        go = _grad_output(kind, n, reduction)
        v, gs, gt = _run(fn, s, t, go, reduction=reduction)
        rv, rgs, rgt = _run(rfn, s, t, go, dtype=F64, reduction=reduction)
        _close(v, rv, f"{kind} {reduction} value")
        _close(gs, rgs, f"{kind} {reduction} grad student")
        _close(gt, rgt, f"{kind} {reduction} grad teacher")


@pytest.mark.parametrize("kind", ["distance", "angle"])
def test_exact_duplicates_student_only(backend, kind):
    """Identical student rows, different teacher rows: the value is the reference's; the
    gradient is finite and equals the PyTorch path in float64, which gives a zero-length
    difference no gradient (the reference's angle gradient there is 1e12-sized)."""
    n = 37 if backend != "triton" else 33
    fn, rfn = _public(kind, backend)
    s, t = _inputs(n, offset=1.0)
    for i, j in ((2, 6), (0, n - 1)):
        s[j] = s[i]
    for reduction in ("mean", "none"):
        go = _grad_output(kind, n, reduction)
        v, gs, gt = _run(fn, s, t, go, reduction=reduction)
        rv, _, rgt = _run(rfn, s, t, go, dtype=F64, reduction=reduction)
        _close(v, rv, f"{kind} {reduction} value")
        _close(gt, rgt, f"{kind} {reduction} grad teacher")
        tv, tgs, tgt = _run(getattr(kd_kernels, LOSSES[kind][0]), s, t, go, dtype=F64, reduction=reduction)
        _close(v, tv, f"{kind} {reduction} value vs torch float64")
        _close(gs, tgs, f"{kind} {reduction} grad student vs torch float64")
        _close(gt, tgt, f"{kind} {reduction} grad teacher vs torch float64")
        if kind == "distance":  # the reference's clamp already gives no gradient there
            _, rgs, _ = _run(rfn, s, t, go, dtype=F64, reduction=reduction)
            _close(gs, rgs, f"{kind} {reduction} grad student")


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("kind", ["distance", "angle"])
def test_all_rows_identical(backend, kind, n):
    """A whole batch of one row (in both networks): the reference's value and gradients
    (the distance loss rejects N = 1: its mean over pairs would be empty)."""
    if kind == "distance" and n == 1:
        pytest.skip("the distance loss rejects N = 1 (needs two rows)")
    fn, rfn = _public(kind, backend)
    s = torch.randn(1, 7).expand(n, 7).contiguous() + 2
    t = torch.randn(1, 5).expand(n, 5).contiguous()
    if kind == "distance" and n == 1:
        with pytest.raises(ValueError, match="N >= 2"):
            fn(s, t)
        return
    for reduction in ("mean", "none"):
        go = _grad_output(kind, n, reduction)
        v, gs, gt = _run(fn, s, t, go, reduction=reduction)
        rv, rgs, rgt = _run(rfn, s, t, go, dtype=F64, reduction=reduction)
        for a, e, name in ((v, rv, "value"), (gs, rgs, "grad student"), (gt, rgt, "grad teacher")):
            assert_close(a, e, rtol=TOL, atol=1e-6, name=f"{kind} {reduction} {name}")


def test_torch_path_has_no_row_hash():
    """The rule needs no bit-hash of rows (docs/rkd.md §4)."""
    assert not hasattr(impl, "row_keys")
