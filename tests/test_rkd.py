"""RKD distance / angle / combined: the PyTorch path against the float64 reference, the ops,
autograd, torch.compile, edge cases and input validation."""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels.losses import rkd as losses
from kd_kernels.ops import rkd as rkd_ops
from kd_kernels.reference import rkd as ref
from kd_kernels.testing import TOLERANCES, assert_close, assert_close_2x, value_and_grads
from kd_kernels.torch_impl import rkd as impl

F64 = torch.float64
FNS = {
    "distance": (losses.rkd_distance_loss, ref.rkd_distance_loss),
    "angle": (losses.rkd_angle_loss, ref.rkd_angle_loss),
}
REDUCTIONS = ("mean", "sum", "none")


def _inputs(n, ds, dt, dtype=torch.float32, teacher_grad=False):
    s = torch.randn(n, ds, dtype=dtype)
    t = torch.randn(n, dt, dtype=dtype).requires_grad_(teacher_grad)
    return s, t


def _compare(actual, expected, rtol, name):
    """Relative check: |a - e| <= rtol * (|e| + max|e|·0.2) elementwise (so entries near 0 are
    judged against the tensor's scale), or both None."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{name}: one side is None"
        return
    scale = expected.detach().abs().max().item()
    assert_close(actual, expected, rtol=rtol, atol=rtol * 0.2 * scale + 1e-300, name=name)


def _check(fn, rfn, s, t, *, rtol, grad_output=None, **kw):
    """Value, student grad and teacher grad of ``fn`` (inputs' dtype) vs ``rfn`` in float64."""
    v, gs, gt = value_and_grads(fn, s, t, grad_output=grad_output, **kw)
    rv, rgs, rgt = value_and_grads(rfn, s, t, grad_output=grad_output, dtype=F64, **kw)
    assert v.dtype == s.dtype and v.shape == rv.shape
    _compare(v, rv, rtol, "value")
    _compare(gs, rgs, rtol, "grad student")
    _compare(gt, rgt, rtol, "grad teacher")
    if not t.requires_grad:
        assert gt is None


def _grad_output(fn, s, t, reduction, **kw):
    shape = fn(s.detach(), t.detach(), reduction=reduction, **kw).shape
    return torch.rand(shape, dtype=F64) + 0.2 if reduction == "none" else torch.tensor(0.37, dtype=F64)


# ------------------------------------------------------------------------------ correctness


@pytest.mark.parametrize("kind", ["distance", "angle"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_float64_matches_reference(kind, reduction, teacher_grad):
    fn, rfn = FNS[kind]
    s, t = _inputs(11, 7, 5, F64, teacher_grad)
    go = _grad_output(fn, s, t, reduction)
    _check(fn, rfn, s, t, rtol=1e-10, grad_output=go, reduction=reduction)


@pytest.mark.parametrize("kind", ["distance", "angle"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float32_realistic_matches_reference(kind, reduction):
    fn, rfn = FNS[kind]
    s, t = _inputs(64, 128, 96, teacher_grad=True)
    go = _grad_output(fn, s, t, reduction)
    _check(fn, rfn, s, t, rtol=1e-5, grad_output=go, reduction=reduction)


@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunk_boundaries(dtype, rtol, reduction):
    """Row blocks / anchor chunks that do not divide N (13 = 5 + 5 + 3, 13 = 4·3 + 1)."""
    n = 13
    s, t = _inputs(n, 6, 9, dtype)
    for kind in ("distance", "angle"):
        rfn = FNS[kind][1]
        rs = s.detach().to(F64).clone().requires_grad_()
        rt = t.detach().to(F64).clone().requires_grad_()
        rv = rfn(rs, rt, reduction=reduction)
        go = torch.rand_like(rv) + 0.2
        rv.backward(go)
        if kind == "distance":
            v, mu_s, mu_t = impl.rkd_distance_fwd(s, t, reduction, block_rows=5)
            gs, gt = impl.rkd_distance_bwd(go.to(dtype), s, t, mu_s, mu_t, reduction, True, True, block_rows=5)
        else:
            v = impl.rkd_angle_fwd(s, t, reduction, chunk=4)
            gs, gt = impl.rkd_angle_bwd(go.to(dtype), s, t, reduction, True, True, chunk=4)
        _compare(v, rv, rtol, f"{kind} value")
        _compare(gs, rs.grad, rtol, f"{kind} grad student")
        _compare(gt, rt.grad, rtol, f"{kind} grad teacher")


def test_rkd_loss_matches_reference():
    s, t = _inputs(16, 12, 20, teacher_grad=True)
    _check(kd_kernels.rkd_loss, ref.rkd_loss, s, t, rtol=1e-5, grad_output=torch.tensor(0.37, dtype=F64))
    _check(kd_kernels.rkd_loss, ref.rkd_loss, s.double(), t.double(), rtol=1e-10, distance_weight=1.0, angle_weight=2.0)


@pytest.mark.parametrize("kind", ["distance", "angle"])
def test_non_contiguous_inputs(kind):
    fn, rfn = FNS[kind]
    s = torch.randn(8, 10).T  # [10, 8], transposed view
    t = torch.randn(10, 15)[:, ::3]  # [10, 5], strided view
    assert not s.is_contiguous() and not t.is_contiguous()
    _check(fn, rfn, s, t.requires_grad_(), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["distance", "angle"])
def test_low_precision(kind, dtype):
    """The result has the student's dtype; the 2x rule against the reference run in the same
    dtype. Exception: the fp16 reference angle loss is NaN (F.normalize's eps 1e-12 underflows
    to 0 in fp16, so the zero difference vector x_a - x_a gives 0/0); there, the fallback
    tolerance of the dtype against the float64 reference."""
    fn, rfn = FNS[kind]
    s, t = _inputs(16, 24, 32, dtype)
    v, gs, _ = value_and_grads(fn, s, t)
    rv, rgs, _ = value_and_grads(rfn, s, t, dtype=F64)
    bv, bgs, _ = value_and_grads(rfn, s, t)
    assert v.dtype == dtype and gs.dtype == dtype
    if kind == "angle" and dtype == torch.float16:
        assert bv.isnan()
        _compare(v, rv, TOLERANCES[dtype][0], "value")
        _compare(gs, rgs, TOLERANCES[dtype][0], "grad student")
    else:
        assert_close_2x(v, rv, bv, name="value")
        assert_close_2x(gs, rgs, bgs, name="grad student", floor=1e-4 * rgs.abs().max().item())


# ------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_duplicated_rows_match_reference(dtype, reduction):
    """Identical rows: clamped distance 1e-6 with zero gradient, psi = 0 on degenerate triples."""
    s, t = _inputs(10, 6, 8, dtype)
    for dst, src in ((3, 1), (7, 1), (9, 4)):
        s[dst], t[dst] = s[src], t[src]
    s[5] = s[2]  # a student-only duplicate (the teacher rows differ): fine for the distance loss
    rtol = 1e-10 if dtype == F64 else 1e-5
    for kind in ("distance", "angle"):
        fn, rfn = FNS[kind]
        ss = s.clone()
        if kind == "angle":
            ss[5] = torch.randn(6, dtype=dtype)  # see test_student_only_duplicate_angle
        go = _grad_output(fn, ss, t, reduction)
        _check(fn, rfn, ss, t.clone().requires_grad_(), rtol=rtol, grad_output=go, reduction=reduction)


def test_student_only_duplicate_angle():
    """Deviation (documented): where only the student has two identical rows, the reference's
    gradient on them is ~1/eps = 1e12 times a nonzero number (F.normalize of a zero vector);
    ours holds the degenerate psi = 0 constant. Values agree; the other rows' gradients agree."""
    s, t = _inputs(7, 4, 5, F64)
    s[3] = s[1]
    v, gs, _ = value_and_grads(losses.rkd_angle_loss, s, t)
    rv, rgs, _ = value_and_grads(ref.rkd_angle_loss, s, t)
    assert_close(v, rv, name="value")
    keep = [0, 2, 4, 5, 6]
    assert_close(gs[keep], rgs[keep], name="other rows' grads")
    assert rgs[1].abs().max() > 1e6 and gs[1].abs().max() < 1


def test_nearly_coincident_rows_angle():
    """Distinct rows closer than the fp32 Gram route can resolve (|x_1 - x_0| ~ 1e-5·|x|):
    ψ at that pair is rounding noise, which used to reach 1e5 (loss 2e5 instead of 0.016,
    gradients 1e16). Now the unresolved difference is treated as zero (ψ = 0, no gradient) and
    ψ is clamped to [-1, 1]: the value stays within 2 % of the reference (only the O(N) triples
    at that pair differ), the gradients bounded. In float64 the pair is resolved (gradients at the pair to ~1e-4)."""
    s = torch.randn(16, 64) * 3 + 5
    t = torch.randn(16, 32)
    s[1] = s[0] + 1e-5 * torch.randn(64)
    v, gs, _ = value_and_grads(losses.rkd_angle_loss, s, t)
    rv = ref.rkd_angle_loss(s.double(), t.double())
    assert abs(v.item() - rv.item()) < 2e-2 * rv.item()
    assert gs.abs().max() < 1e-2
    _check(losses.rkd_angle_loss, ref.rkd_angle_loss, s.double(), t.double(), rtol=2e-4)


def test_transposed_input_grads_are_contiguous():
    """The backward ops return contiguous gradients, as their fake kernels declare (the
    distance backward used to return a transposed student's strides: opcheck failed and
    torch.compile's inductor backward raised a stride assertion)."""
    s, t = torch.randn(8, 10).T, torch.randn(10, 5)[:, ::2]
    _, mu_s, mu_t = rkd_ops.rkd_distance_fwd(s, t, "mean", "torch")
    torch.library.opcheck(rkd_ops.rkd_distance_bwd, (torch.ones(()), s, t, mu_s, mu_t, "mean", True, True, "torch"))
    torch.library.opcheck(rkd_ops.rkd_angle_bwd, (torch.ones(()), s, t, "mean", True, True, "torch"))


def test_all_rows_identical():
    s, t = torch.ones(5, 3).mul(0.3), torch.ones(5, 4)
    for kind in ("distance", "angle"):
        fn, rfn = FNS[kind]
        _check(fn, rfn, s, t, rtol=1e-6)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("kind", ["distance", "angle"])
def test_tiny_n(kind, n):
    fn, rfn = FNS[kind]
    s, t = _inputs(n, 4, 3, F64, teacher_grad=True)
    v, gs, gt = value_and_grads(fn, s, t)
    rv, rgs, rgt = value_and_grads(rfn, s, t, dtype=F64)
    # N = 2 angle: every non-degenerate triple is (a, b, b) with psi = 1 for both, so the loss
    # and gradients are 0 up to rounding: compare absolutely.
    for a, e, name in ((v, rv, "value"), (gs, rgs, "grad student"), (gt, rgt, "grad teacher")):
        assert_close(a, e, rtol=1e-9, atol=1e-12, name=name)


def test_angle_n1_is_zero():
    """N = 1: the only triple is degenerate; loss 0 and zero gradients, as the reference."""
    s, t = _inputs(1, 4, 3, F64, teacher_grad=True)
    for reduction in REDUCTIONS:
        v, gs, gt = value_and_grads(losses.rkd_angle_loss, s, t, reduction=reduction)
        rv, rgs, rgt = value_and_grads(ref.rkd_angle_loss, s, t, reduction=reduction)
        assert_close(v, rv, atol=0, rtol=0)
        assert_close(gs, rgs, atol=0, rtol=0)
        assert_close(gt, rgt, atol=0, rtol=0)
        assert v.abs().max() == 0


def test_row_keys():
    x = torch.randn(6, 5)
    x[4] = x[1]
    x[2, 0], x[5] = 0.0, x[2]
    x[5, 0] = -0.0  # equal value, different bits
    x[3] = x[1]
    x[3, 2] = torch.nextafter(x[1, 2], torch.tensor(1e9))  # one ulp apart
    k = impl.row_keys(x)
    assert k[4] == k[1] and k[5] == k[2]
    assert len(set(k[[0, 1, 2, 3]].tolist())) == 4
    kd = impl.row_keys(x.double())
    assert kd[4] == kd[1] and kd[5] == kd[2] and kd[3] != kd[1]


# ---------------------------------------------------------------------- autograd, ops, compile


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    s, t = _inputs(5, 3, 4, F64)
    s.requires_grad_()
    t.requires_grad_()
    for fn in (losses.rkd_distance_loss, losses.rkd_angle_loss):
        assert torch.autograd.gradcheck(lambda a, b, fn=fn: fn(a, b, reduction=reduction), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: losses.rkd_loss(a, b, distance_weight=1.5, angle_weight=3.0), (s, t))


@pytest.mark.parametrize(
    "n,ds,dt,dtype,reduction,need",
    [
        (6, 4, 5, torch.float32, "mean", (True, False)),
        (3, 2, 2, F64, "none", (True, True)),
        (5, 3, 4, F64, "sum", (False, True)),
    ],
)
def test_opcheck(n, ds, dt, dtype, reduction, need):
    s, t = _inputs(n, ds, dt, dtype)
    sg, tg = s.clone().requires_grad_(need[0]), t.clone().requires_grad_(need[1])
    torch.library.opcheck(rkd_ops.rkd_distance_fwd, (sg, tg, reduction, "torch"))
    torch.library.opcheck(rkd_ops.rkd_angle_fwd, (sg, tg, reduction, "torch"))
    loss, mu_s, mu_t = rkd_ops.rkd_distance_fwd(s, t, reduction, "torch")
    g = torch.rand_like(loss)
    torch.library.opcheck(rkd_ops.rkd_distance_bwd, (g, s, t, mu_s, mu_t, reduction, *need, "torch"))
    ga = torch.rand_like(rkd_ops.rkd_angle_fwd(s, t, reduction, "torch"))
    torch.library.opcheck(rkd_ops.rkd_angle_bwd, (ga, s, t, reduction, *need, "torch"))


def test_unneeded_grads_are_empty():
    s, t = _inputs(4, 3, 3)
    _, mu_s, mu_t = rkd_ops.rkd_distance_fwd(s, t, "mean", "torch")
    assert mu_s.dtype == torch.float32 and mu_s.shape == ()
    gs, gt = rkd_ops.rkd_distance_bwd(torch.ones(()), s, t, mu_s, mu_t, "mean", True, False, "torch")
    assert gs.shape == s.shape and gt.numel() == 0
    gs, gt = rkd_ops.rkd_angle_bwd(torch.ones(()), s, t, "mean", False, True, "torch")
    assert gs.numel() == 0 and gt.shape == t.shape


def test_unknown_backend_in_op():
    s, t = _inputs(4, 3, 3)
    with pytest.raises(NotImplementedError, match="no 'fastest' kernel"):
        rkd_ops.rkd_angle_fwd(s, t, "mean", "fastest")


@pytest.mark.parametrize(
    "fn,kw,backend",
    [
        (losses.rkd_distance_loss, {"reduction": "mean"}, "inductor"),
        (losses.rkd_angle_loss, {"reduction": "mean"}, "inductor"),
        (losses.rkd_loss, {}, "inductor"),
        (losses.rkd_distance_loss, {"reduction": "none"}, "aot_eager"),
        (losses.rkd_angle_loss, {"reduction": "none"}, "aot_eager"),
        (losses.rkd_angle_loss, {"reduction": "sum"}, "aot_eager"),
    ],
)
def test_compile_matches_eager(fn, kw, backend):
    torch._dynamo.reset()
    s, t = _inputs(9, 5, 6, teacher_grad=True)
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    go = torch.rand(fn(s, t, **kw).shape) + 0.2
    v, gs, gt = value_and_grads(fn, s, t, grad_output=go, **kw)
    cv, cgs, cgt = value_and_grads(compiled, s, t, grad_output=go, **kw)
    assert_close(cv, v, name="value")
    assert_close(cgs, gs, name="grad student")
    assert_close(cgt, gt, name="grad teacher")


def test_functional_equals_module():
    s, t = _inputs(8, 5, 7)
    assert kd_kernels.functional.rkd_distance_loss is losses.rkd_distance_loss
    assert kd_kernels.nn.RKDLoss is losses.RKDLoss
    pairs = [
        (losses.RKDDistanceLoss(reduction="none"), lambda a, b: losses.rkd_distance_loss(a, b, reduction="none")),
        (losses.RKDAngleLoss(reduction="sum"), lambda a, b: losses.rkd_angle_loss(a, b, reduction="sum")),
        (
            losses.RKDLoss(distance_weight=2.0, angle_weight=3.0),
            lambda a, b: losses.rkd_loss(a, b, distance_weight=2.0, angle_weight=3.0),
        ),
        (kd_kernels.RKDLoss(), kd_kernels.rkd_loss),
    ]
    for module, fn in pairs:
        v, gs, _ = value_and_grads(module, s, t, grad_output=None)
        fv, fgs, _ = value_and_grads(fn, s, t, grad_output=None)
        assert torch.equal(v, fv) and torch.equal(gs, fgs)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", ["rkd_distance_loss", "rkd_angle_loss", "rkd_loss"])
def test_bad_input(name):
    fn = getattr(kd_kernels, name)
    s, t = _inputs(4, 3, 5)
    with pytest.raises(ValueError, match=r"student must have shape \[N, Ds\]"):
        fn(s[None], t)
    with pytest.raises(ValueError, match="teacher"):
        fn(s, t[:, 0])
    with pytest.raises(ValueError, match=r"must agree in every dim"):
        fn(s, t[:3])
    with pytest.raises(ValueError, match="teacher is on meta"):
        fn(s, t.to("meta"))
    with pytest.raises(TypeError, match="student must be float16, bfloat16, float32 or float64"):
        fn(s.long(), t)
    with pytest.raises(TypeError, match="teacher must be a torch.Tensor"):
        fn(s, t.numpy())
    with pytest.raises(ValueError, match="backend must be one of"):
        fn(s, t, backend="jax")
    with pytest.raises(ValueError, match="backend='cuda'"):
        fn(s, t, backend="cuda")
    if name != "rkd_loss":
        with pytest.raises(ValueError, match="reduction must be one of"):
            fn(s, t, reduction="batchmean")


def test_too_few_rows():
    s, t = _inputs(1, 3, 5)
    for fn in (kd_kernels.rkd_distance_loss, kd_kernels.rkd_loss):
        with pytest.raises(ValueError, match=r"N >= 2"):
            fn(s, t)
    with pytest.raises(ValueError, match=r"N >= 1"):
        kd_kernels.rkd_angle_loss(s[:0], t[:0])


def test_bad_weights():
    s, t = _inputs(4, 3, 5)
    with pytest.raises(ValueError, match="distance_weight must be >= 0"):
        kd_kernels.rkd_loss(s, t, distance_weight=-1.0)
    with pytest.raises(TypeError, match="angle_weight must be a Python number"):
        kd_kernels.rkd_loss(s, t, angle_weight=torch.tensor(2.0))
