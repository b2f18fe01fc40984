"""Tests of the CUDA C++ RKD ops (csrc/cuda/rkd.cu, schemas in kd_kernels/ops/rkd_cuda_defs.py).

The GPU tests compare ``rkd_distance_fwd_cuda`` / ``_bwd_cuda`` and ``rkd_angle_fwd_cuda`` /
``_bwd_cuda`` with the float64 reference (kd_kernels.reference.rkd, gradients through autograd,
teacher gradient included when asked for), on the same inputs upcast, so only the kernels' own error
is measured. They skip with "no CUDA device" without a GPU and with "kd_kernels._C not built: ..."
when the extension does not load or lacks the RKD ops. The fake-impl test runs on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kd_kernels._backend import extension_error, load_extension
from kd_kernels.ops.rkd_cuda_defs import RKD_CUDA_OPS
from kd_kernels.reference import rkd as ref
from kd_kernels.testing import assert_close

ops = torch.ops.kd_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
REDUCTIONS = ["mean", "sum", "none"]
# Error bound relative to the reference's largest magnitude (elementwise: atol = TOL * max|ref|,
# rtol = TOL). The kernels compute in float32 (float64 for float64); the low-precision results are
# rounded to the input dtype at the end (half an ulp: 4.9e-4 for float16, 3.9e-3 for bfloat16).
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
DS, DT = 33, 20  # Ds != Dt, neither a multiple of the kernels' feature chunks


@pytest.fixture(scope="module")
def cuda_ops():
    """Skip unless a GPU is present and kd_kernels._C registers the RKD ops on CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if load_extension() is None:
        pytest.skip(f"kd_kernels._C not built: {extension_error()}")
    missing = [op for op in RKD_CUDA_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    if missing:
        pytest.skip(f"kd_kernels._C not built: the extension has no CUDA kernel for {missing}")


def _close(actual, expected, dtype, name, compute_dtype=None):
    """``actual`` has ``dtype`` and matches ``expected`` within TOL of ``compute_dtype`` (the
    student's dtype, in which the kernels run; default ``dtype``)."""
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype} != {dtype}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    tol = max(TOL[dtype], TOL[compute_dtype or dtype])
    # The floor covers N = 2, where the exact loss is 0 and float32 rounding leaves ~1e-15 (the
    # b = c triples of the angle loss have cosine 1 up to rounding in both networks).
    assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-9), name=name)


def _reference(fn, student, teacher, reduction, grad, need_teacher):
    """float64 value and gradients of the reference, seeded with the same upstream gradient."""
    s = student.detach().double().requires_grad_(True)
    t = teacher.detach().double().requires_grad_(need_teacher)
    out = fn(s, t, reduction=reduction)
    out.backward(grad.double())
    return out.detach(), s.grad, t.grad


def _features(n, dtype, *, dup=None, ds=DS, dt=DT):
    """Random student/teacher features on the GPU; ``dup`` copies row 0 into the last row of
    "both" networks or of the "student" only."""
    s = torch.randn(n, ds, device="cuda", dtype=torch.float64)
    t = torch.randn(n, dt, device="cuda", dtype=torch.float64)
    if dup in ("both", "student"):
        s[-1] = s[0]
    if dup == "both":
        t[-1] = t[0]
    return s.to(dtype), t.to(dtype)


def _check_distance(s, t, reduction, need_teacher):
    loss, mu_s, mu_t = ops.rkd_distance_fwd_cuda(s, t, reduction)
    mu_dtype = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
    assert mu_s.shape == () and mu_t.shape == () and mu_s.dtype == mu_dtype and mu_t.dtype == mu_dtype
    grad = (torch.rand(loss.shape, device="cuda", dtype=torch.float64) + 0.3).to(loss.dtype)
    gs, gt = ops.rkd_distance_bwd_cuda(grad, s, t, mu_s, mu_t, reduction, True, need_teacher)
    rv, rgs, rgt = _reference(ref.rkd_distance_loss, s, t, reduction, grad, need_teacher)
    _close(loss, rv, s.dtype, "loss")
    _close(gs, rgs, s.dtype, "grad student")
    if need_teacher:
        _close(gt, rgt, t.dtype, "grad teacher", s.dtype)
    else:
        assert gt.numel() == 0


def _check_angle(s, t, reduction, need_teacher):
    loss = ops.rkd_angle_fwd_cuda(s, t, reduction)
    grad = (torch.rand(loss.shape, device="cuda", dtype=torch.float64) + 0.3).to(loss.dtype)
    gs, gt = ops.rkd_angle_bwd_cuda(grad, s, t, reduction, True, need_teacher)
    rv, rgs, rgt = _reference(ref.rkd_angle_loss, s, t, reduction, grad, need_teacher)
    _close(loss, rv, s.dtype, "loss")
    _close(gs, rgs, s.dtype, "grad student")
    if need_teacher:
        _close(gt, rgt, t.dtype, "grad teacher", s.dtype)
    else:
        assert gt.numel() == 0


def test_fake_impls_give_shapes_and_dtypes_on_meta():
    """CPU-runnable: the registered fakes on meta tensors and under FakeTensorMode."""
    for dtype, t_dtype, mu_dtype in [
        (torch.float16, torch.float32, torch.float32),
        (torch.float64, torch.float32, torch.float64),
        (torch.float32, torch.float64, torch.float64),
    ]:
        s = torch.empty(7, 5, device="meta", dtype=dtype)
        t = torch.empty(7, 3, device="meta", dtype=t_dtype)
        for reduction, dshape, ashape in [("mean", (), ()), ("sum", (), ()), ("none", (7, 7), (7,))]:
            loss, mu_s, mu_t = ops.rkd_distance_fwd_cuda(s, t, reduction)
            assert (loss.shape, loss.dtype) == (dshape, dtype)
            assert (mu_s.shape, mu_s.dtype, mu_t.shape, mu_t.dtype) == ((), mu_dtype, (), mu_dtype)
            loss = ops.rkd_angle_fwd_cuda(s, t, reduction)
            assert (loss.shape, loss.dtype) == (ashape, dtype)
            g = s.new_empty(ashape)
            for need_s, need_t in [(True, True), (True, False), (False, True)]:
                gs, gt = ops.rkd_distance_bwd_cuda(s.new_empty(dshape), s, t, mu_s, mu_t, reduction, need_s, need_t)
                ga_s, ga_t = ops.rkd_angle_bwd_cuda(g, s, t, reduction, need_s, need_t)
                for x, like, need in [(gs, s, need_s), (gt, t, need_t), (ga_s, s, need_s), (ga_t, t, need_t)]:
                    assert x.dtype == like.dtype
                    assert x.shape == (like.shape if need else (0,))
    with FakeTensorMode():
        s, t = torch.empty(4, 6), torch.empty(4, 2)
        loss, mu_s, _ = ops.rkd_distance_fwd_cuda(s, t, "none")
        assert loss.shape == (4, 4) and mu_s.dtype == torch.float32
        assert ops.rkd_angle_fwd_cuda(s, t, "none").shape == (4,)


@pytest.mark.gpu
@pytest.mark.parametrize("need_teacher", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", [2, 3, 17, 130, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_distance_matches_reference(cuda_ops, dtype, n, reduction, need_teacher):
    s, t = _features(n, dtype)
    _check_distance(s, t, reduction, need_teacher)


@pytest.mark.gpu
@pytest.mark.parametrize("need_teacher", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", [2, 3, 17, 130])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_angle_matches_reference(cuda_ops, dtype, n, reduction, need_teacher):
    s, t = _features(n, dtype)
    _check_angle(s, t, reduction, need_teacher)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_angle_matches_reference_n1000(cuda_ops, reduction):
    # The reference materializes N^3 float64 tensors (8 GB each at N = 1000): one dtype, small D.
    s, t = _features(1000, torch.float32, ds=16, dt=12)
    _check_angle(s, t, reduction, True)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_duplicated_rows(cuda_ops, dtype, reduction):
    """A row repeated in both networks (zero distances, zero difference vectors), and for the
    distance loss in the student only (its distance clamped to 1e-6, without gradient)."""
    s, t = _features(17, dtype, dup="both")
    _check_distance(s, t, reduction, True)
    _check_angle(s, t, reduction, True)
    s, t = _features(17, dtype, dup="student")
    _check_distance(s, t, reduction, True)


@pytest.mark.gpu
def test_angle_degenerate_n1(cuda_ops):
    s, t = _features(1, torch.float32)
    _check_angle(s, t, "mean", True)


@pytest.mark.gpu
def test_noncontiguous_and_mixed_dtype_inputs(cuda_ops):
    s = torch.randn(DS, 40, device="cuda").t()  # [40, Ds] transposed view
    t = torch.randn(40, 2 * DT, device="cuda", dtype=torch.float64)[:, ::2]  # strided, float64 teacher
    assert not s.is_contiguous() and not t.is_contiguous()
    for reduction in REDUCTIONS:
        _check_distance(s, t, reduction, True)
        _check_angle(s, t, reduction, True)


@pytest.mark.gpu
def test_gradients_not_needed_are_empty(cuda_ops):
    s, t = _features(9, torch.float32)
    _, mu_s, mu_t = ops.rkd_distance_fwd_cuda(s, t, "mean")
    g = torch.tensor(0.37, device="cuda")
    gs, gt = ops.rkd_distance_bwd_cuda(g, s, t, mu_s, mu_t, "mean", False, False)
    assert gs.numel() == 0 and gt.numel() == 0 and gs.dtype == s.dtype and gt.dtype == t.dtype
    gs, gt = ops.rkd_angle_bwd_cuda(g, s, t, "mean", False, True)
    assert gs.numel() == 0 and gt.shape == t.shape
    s, t = _features(9, torch.float32)
    _check_distance(s, t, "sum", False)


@pytest.mark.gpu
def test_opcheck(cuda_ops):
    s, t = _features(70, torch.float32)
    for reduction in REDUCTIONS:
        loss, mu_s, mu_t = ops.rkd_distance_fwd_cuda(s, t, reduction)
        torch.library.opcheck(ops.rkd_distance_fwd_cuda.default, (s, t, reduction))
        torch.library.opcheck(
            ops.rkd_distance_bwd_cuda.default, (torch.ones_like(loss), s, t, mu_s, mu_t, reduction, True, False)
        )
        loss = ops.rkd_angle_fwd_cuda(s, t, reduction)
        torch.library.opcheck(ops.rkd_angle_fwd_cuda.default, (s, t, reduction))
        torch.library.opcheck(ops.rkd_angle_bwd_cuda.default, (torch.ones_like(loss), s, t, reduction, True, True))


@pytest.mark.gpu
def test_bad_inputs_raise_named_errors(cuda_ops):
    s, t = _features(5, torch.float32)
    with pytest.raises(RuntimeError, match="reduction"):
        ops.rkd_distance_fwd_cuda(s, t, "avg")
    with pytest.raises(RuntimeError, match="teacher"):
        ops.rkd_angle_fwd_cuda(s, t[:4], "mean")
    with pytest.raises(RuntimeError, match="student"):
        ops.rkd_angle_fwd_cuda(s[0], t, "mean")
    with pytest.raises(RuntimeError, match="N >= 2"):
        ops.rkd_distance_fwd_cuda(s[:1], t[:1], "mean")
    with pytest.raises(RuntimeError, match="grad"):
        ops.rkd_angle_bwd_cuda(torch.ones(4, device="cuda"), s, t, "none", True, False)
    with pytest.raises(NotImplementedError):
        ops.rkd_angle_fwd_cuda(s.cpu(), t.cpu(), "mean")
