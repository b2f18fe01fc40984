"""Triton kernels of the RKD family (kd_kernels/triton/rkd.py) against the float64 reference.

The launchers are compared directly (values, saved means, gradients) through a small
autograd.Function wrapper, so the tests do not depend on the ops' dispatch table. They run
on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, where tiles are 32 wide, so
N = 40 and N = 70 span several tiles) or on a CUDA device; otherwise they are skipped.

    TRITON_INTERPRET=1 .venv/bin/pytest tests/test_rkd_triton.py
"""

from __future__ import annotations

import pytest
import torch

from kd_kernels._backend import TRITON_INTERPRET
from kd_kernels.reference.rkd import rkd_angle_loss, rkd_distance_loss
from kd_kernels.testing import assert_close, assert_matches_reference, value_and_grads


def _devices() -> list:
    if TRITON_INTERPRET:
        return ["cpu"]
    return [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else []


DEVICES = _devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton needs a CUDA device or TRITON_INTERPRET=1")
REDUCTIONS = ["mean", "sum", "none"]


def _kernels():
    from kd_kernels.triton import rkd  # imports triton: only once the module is not skipped

    return rkd


class _Distance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, reduction):
        loss, mu_s, mu_t = _kernels().rkd_distance_fwd_triton(student, teacher, reduction)
        ctx.save_for_backward(student, teacher, mu_s, mu_t)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad):
        s, t, mu_s, mu_t = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gs, gt = _kernels().rkd_distance_bwd_triton(grad, s, t, mu_s, mu_t, ctx.reduction, need_s, need_t)
        return gs, gt, None


class _Angle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, reduction):
        ctx.save_for_backward(student, teacher)
        ctx.reduction = reduction
        return _kernels().rkd_angle_fwd_triton(student, teacher, reduction)

    @staticmethod
    def backward(ctx, grad):
        s, t = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gs, gt = _kernels().rkd_angle_bwd_triton(grad, s, t, ctx.reduction, need_s, need_t)
        return gs, gt, None


def triton_distance(student, teacher, *, reduction="mean"):
    return _Distance.apply(student, teacher, reduction)


def triton_angle(student, teacher, *, reduction="mean"):
    return _Angle.apply(student, teacher, reduction)


LOSSES = {"distance": (triton_distance, rkd_distance_loss), "angle": (triton_angle, rkd_angle_loss)}


def _grad_output(loss: str, reduction: str, n: int, device) -> torch.Tensor:
    if reduction != "none":
        return torch.tensor(0.37, device=device)
    return torch.randn((n, n) if loss == "distance" else (n,), device=device)


def _inputs(n, ds, dt, device, dtype=torch.float32, teacher_grad=True):
    s = torch.randn(n, ds, device=device, dtype=dtype)
    t = torch.randn(n, dt, device=device, dtype=dtype).requires_grad_(teacher_grad)
    return s, t


def _check(loss, s, t, reduction, **tol):
    fn, ref = LOSSES[loss]
    g = _grad_output(loss, reduction, s.shape[0], s.device)
    assert_matches_reference(fn, ref, s, t, grad_output=g, reduction=reduction, name=f"{loss}/{reduction}", **tol)


# (N, Ds, Dt): tiny, odd widths, Ds != Dt, and N spanning several 32-row tiles (three for
# the distance; two for the angle, whose interpreted cost grows as N^3)
DIST_SHAPES = [(2, 3, 5), (3, 4, 4), (5, 7, 3), (17, 9, 33), (70, 40, 31)]
ANGLE_CASES = [(shape, r) for shape in [(2, 3, 5), (3, 4, 4), (5, 7, 3), (17, 9, 33)] for r in REDUCTIONS]
ANGLE_CASES += [((40, 12, 7), "mean"), ((40, 12, 7), "none")]


@pytest.mark.parametrize("device", DEVICES or ["none"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", DIST_SHAPES, ids=str)
def test_distance_matches_reference(device, shape, reduction):
    _check("distance", *_inputs(*shape, device), reduction)


@pytest.mark.parametrize("device", DEVICES or ["none"])
@pytest.mark.parametrize(("shape", "reduction"), ANGLE_CASES, ids=str)
def test_angle_matches_reference(device, shape, reduction):
    _check("angle", *_inputs(*shape, device), reduction)


@pytest.mark.parametrize("device", DEVICES or ["none"])
@pytest.mark.parametrize("loss", ["distance", "angle"])
def test_teacher_without_grad(device, loss):
    """need_teacher=False: only the student's gradient, the teacher's stays None."""
    s, t = _inputs(20, 6, 10, device, teacher_grad=False)
    _check(loss, s, t, "mean")
    _, _, gt = value_and_grads(LOSSES[loss][0], s, t, reduction="mean")
    assert gt is None


@pytest.mark.parametrize("device", DEVICES or ["none"])
def test_need_flags(device):
    """Launchers return None for every gradient not asked for."""
    k = _kernels()
    s, t = _inputs(6, 4, 3, device, teacher_grad=False)
    g = torch.tensor(1.0, device=device)
    _, mu_s, mu_t = k.rkd_distance_fwd_triton(s, t, "mean")
    assert k.rkd_distance_bwd_triton(g, s, t, mu_s, mu_t, "mean", False, False) == (None, None)
    gs, gt = k.rkd_distance_bwd_triton(g, s, t, mu_s, mu_t, "mean", False, True)
    assert gs is None and gt.shape == t.shape
    assert k.rkd_angle_bwd_triton(g, s, t, "mean", False, False) == (None, None)
    gs, gt = k.rkd_angle_bwd_triton(g, s, t, "mean", False, True)
    assert gs is None and gt.shape == t.shape


@pytest.mark.parametrize("device", DEVICES or ["none"])
def test_saved_means(device):
    """mu_s, mu_t are the mean off-diagonal distances (0-dim, float32 for fp32 inputs)."""
    s, t = _inputs(37, 5, 8, device)
    _, mu_s, mu_t = _kernels().rkd_distance_fwd_triton(s, t, "mean")
    for mu, x in ((mu_s, s), (mu_t, t)):
        d = torch.cdist(x.detach().double(), x.detach().double())
        expected = d.sum() / (37 * 36)
        assert mu.shape == () and mu.dtype == torch.float32
        assert_close(mu, expected, name="mu")


@pytest.mark.parametrize("device", DEVICES or ["none"])
@pytest.mark.parametrize(("loss", "reduction"), [*(("distance", r) for r in REDUCTIONS), ("angle", "none")])
def test_duplicated_rows(device, loss, reduction):
    """Identical rows (in both networks, and some in one network only) reproduce the
    reference: distance 1e-6 at the clamp with no gradient, psi = 0 at a zero difference.
    Angle: where only one network has a zero difference, the reference's gradient for that
    network is F.normalize's 1/eps = 1e12 slope at 0 (the kernels give 0), so the angle case
    keeps student-only duplicates out and compares the student only (see also
    test_angle_student_only_duplicate)."""
    s, t = _inputs(35, 6, 9, device)
    for x in (s, t):  # in both networks, one pair inside a tile and one across tiles
        x.data[5] = x.data[2]
        x.data[34] = x.data[0]
    t.data[30] = t.data[31]  # teacher only
    if loss == "distance":
        s.data[11] = s.data[20]  # student only
    else:
        t.requires_grad_(False)
    _check(loss, s, t, reduction)


@pytest.mark.parametrize("device", DEVICES or ["none"])
def test_angle_student_only_duplicate(device):
    """Rows identical in the student only: same value as the reference; the reference's
    student gradient there is F.normalize's 1/eps = 1e12 slope at 0, the kernels give 0
    for those pairs, so the gradient is only checked to be finite."""
    s, t = _inputs(9, 5, 4, device, teacher_grad=False)
    s.data[3] = s.data[7]
    v, gs, _ = value_and_grads(triton_angle, s, t)
    assert_close(v, rkd_angle_loss(s.double(), t.double()), name="angle value")
    assert torch.isfinite(gs).all()


@pytest.mark.parametrize("device", DEVICES or ["none"])
@pytest.mark.parametrize("loss", ["distance", "angle"])
def test_non_contiguous(device, loss):
    """Transposed and strided views are read through their strides."""
    s = torch.randn(7, 21, device=device).T  # [21, 7], column-major
    t = torch.randn(21, 10, device=device)[:, ::2].requires_grad_(True)  # [21, 5], stride 2
    _check(loss, s, t, "none")


@pytest.mark.parametrize("device", DEVICES or ["none"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", ["distance", "angle"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_other_dtypes(device, loss, dtype, reduction):
    """fp16/bf16 are computed in fp32 from the exact inputs, so the only loss of accuracy is
    the final rounding to the input dtype (rtol ~ 2 eps of that dtype, scaled to the largest
    entry); float64 is computed in fp32 (fp32 tolerance). Results keep the input dtypes."""
    s, t = _inputs(13, 7, 5, device, dtype=dtype)
    fn, ref = LOSSES[loss]
    g = _grad_output(loss, reduction, 13, device)
    out = value_and_grads(fn, s, t, grad_output=g, reduction=reduction)
    expected = value_and_grads(ref, s, t, grad_output=g, reduction=reduction, dtype=torch.float64)
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 2e-5}[dtype]
    for name, a, e, x in zip(("value", "grad student", "grad teacher"), out, expected, (s, s, t)):
        assert a.dtype == x.dtype, f"{name}: dtype {a.dtype} != {x.dtype}"
        assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item(), name=f"{loss}/{dtype}/{name}")
    if loss == "distance":
        mu = _kernels().rkd_distance_fwd_triton(s, t, reduction)[1]
        assert mu.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("device", DEVICES or ["none"])
def test_single_row(device):
    """N = 1: the reference's distance mean is over an empty set (NaN loss, zero gradients);
    the angle loss is 0 (every triple is degenerate)."""
    s, t = _inputs(1, 4, 3, device)
    v, gs, gt = value_and_grads(triton_distance, s, t)
    rv, rgs, rgt = value_and_grads(rkd_distance_loss, s, t, dtype=torch.float64)
    assert torch.isnan(v) and torch.isnan(rv)
    assert_close(gs, rgs, name="grad student")
    assert_close(gt, rgt, name="grad teacher")
    _check("angle", s, t, "mean")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["distance", "angle"])
def test_public_api_backend_triton(device, loss):
    """The public function with backend="triton" goes through the custom op to these kernels:
    same value and gradients as the float64 reference, and the op passes opcheck."""
    import kd_kernels
    from kd_kernels.ops import rkd as rkd_ops

    fn = kd_kernels.rkd_distance_loss if loss == "distance" else kd_kernels.rkd_angle_loss
    ref = rkd_distance_loss if loss == "distance" else rkd_angle_loss
    s, t = _inputs(11, 6, 4, device)
    assert_matches_reference(
        lambda a, b, **kw: fn(a, b, backend="triton", **kw),
        ref,
        s,
        t,
        grad_output=torch.tensor(0.37, device=device),
        reduction="mean",
    )
    op = rkd_ops.rkd_distance_fwd if loss == "distance" else rkd_ops.rkd_angle_fwd
    torch.library.opcheck(op, (s.detach().requires_grad_(), t.detach(), "mean", "triton"))


@pytest.mark.parametrize("device", DEVICES or ["none"])
def test_angle_nearly_coincident_rows(device):
    """Distinct rows closer than the fp32 Gram route resolves (|x_1 - x_0| ~ 1e-5·|x|): the
    unresolved difference is treated as zero and psi is clamped to [-1, 1] (as the PyTorch
    path), so the value stays within 2 % of the reference and the gradients stay bounded
    instead of psi ~ 1e5 and gradients ~ 1e16."""
    s = torch.randn(16, 64, device=device) * 3 + 5
    t = torch.randn(16, 32, device=device)
    s[1] = s[0] + 1e-5 * torch.randn(64, device=device)
    v, gs, _ = value_and_grads(triton_angle, s, t)
    rv = rkd_angle_loss(s.double(), t.double())
    assert abs(v.item() - rv.item()) < 2e-2 * rv.item()
    assert gs.abs().max() < 1e-2
