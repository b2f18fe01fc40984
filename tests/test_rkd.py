"""RKD distance / angle / combined: every backend (the ``backend`` fixture of conftest.py) against
the float64 reference through the public functions, plus the ops, autograd, torch.compile, the
PyTorch path's chunking, edge cases and input validation.

Near-duplicate rows (separations far below the fp32 Gram route's resolution) are tested in
tests/test_rkd_near_duplicates.py; kernel contracts (launcher arguments, saved means, schemas)
in the backend-specific files."""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels.losses import rkd as losses
from kd_kernels.ops import rkd as rkd_ops
from kd_kernels.reference import rkd as ref
from kd_kernels.testing import (
    assert_close,
    assert_close_2x,
    low_precision_floor,
    require,
    tolerance,
    value_and_grads,
)
from kd_kernels.torch_impl import rkd as impl

F64 = torch.float64
FNS = {
    "distance": (losses.rkd_distance_loss, ref.rkd_distance_loss),
    "angle": (losses.rkd_angle_loss, ref.rkd_angle_loss),
}
REDUCTIONS = ("mean", "sum", "none")


def _inputs(n, ds, dt, dtype=torch.float32, teacher_grad=False, device="cpu"):
    s = torch.randn(n, ds, dtype=dtype, device=device)
    t = torch.randn(n, dt, dtype=dtype, device=device).requires_grad_(teacher_grad)
    return s, t


def _compare(actual, expected, rtol, name, atol=1e-300):
    """Relative check: |a - e| <= atol + rtol * (|e| + max|e|·0.2) elementwise (so entries near 0
    are judged against the tensor's scale), or both None."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{name}: one side is None"
        return
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=atol + rtol * 0.2 * scale, name=name)


def _check(fn, rfn, s, t, *, rtol=None, grad_output=None, backend=None, **kw):
    """Value, student grad and teacher grad of ``fn`` (inputs' dtype; ``backend=backend`` when
    given) vs ``rfn`` in float64. Default tolerances: the table's, for the dtype and backend."""
    d_rtol, d_atol = tolerance(s.dtype, backend or "torch")
    rtol, atol = (d_rtol, d_atol) if rtol is None else (rtol, 1e-300)
    call = fn if backend is None else (lambda a, b, **k: fn(a, b, backend=backend, **k))
    v, gs, gt = value_and_grads(call, s, t, grad_output=grad_output, **kw)
    rv, rgs, rgt = value_and_grads(rfn, s, t, grad_output=grad_output, dtype=F64, **kw)
    assert v.dtype == s.dtype and v.shape == rv.shape and v.device == s.device
    _compare(v, rv, rtol, "value", atol)
    _compare(gs, rgs, rtol, "grad student", atol)
    _compare(gt, rgt, rtol, "grad teacher", atol)
    if not t.requires_grad:
        assert gt is None


def _grad_output(fn, s, t, reduction, **kw):
    """grad_output != 1: 0.37 for a scalar, random in [0.2, 1.2) for reduction="none"."""
    shape = fn(s.detach().cpu(), t.detach().cpu(), reduction=reduction, **kw).shape
    g = torch.rand(shape, dtype=F64) + 0.2 if reduction == "none" else torch.tensor(0.37, dtype=F64)
    return g.to(s.device)


# ------------------------------------------------------------------------------ the backend matrix
# Every case below runs through the public function once per backend (tests/conftest.py); under
# the Triton interpreter tiles are 32 wide, so N = 37 and N = 70 cross tile edges. Interpreter
# cost grows as N^3 for the angle loss (N = 70 takes ~6 s): the big shapes get few reductions.
NAMES = {"distance": "rkd_distance_loss", "angle": "rkd_angle_loss"}
SHAPES = {"tiny2": (2, 4, 3), "tiny3": (3, 5, 4), "odd37": (37, 24, 17), "real64": (64, 64, 48), "odd70": (70, 40, 31)}
MATRIX = [(shape, r, tg) for shape in ("tiny2", "tiny3", "odd37") for r in REDUCTIONS for tg in (False, True)]
MATRIX += [("real64", r, True) for r in REDUCTIONS]
MATRIX += [("odd70", "none", True), ("odd70", "mean", False)]


@pytest.mark.parametrize("kind", ["distance", "angle"])
@pytest.mark.parametrize(("shape", "reduction", "teacher_grad"), MATRIX, ids=str)
def test_matches_reference(backend, kind, shape, reduction, teacher_grad):
    """fp32 value and gradients (teacher with and without grad, grad_output != 1, the
    reduction="none" backward) vs float64, at tiny, odd and realistic N, Ds != Dt."""
    fn, rfn = FNS[kind]
    device = require(backend, NAMES[kind])
    s, t = _inputs(*SHAPES[shape], teacher_grad=teacher_grad, device=device)
    _check(fn, rfn, s, t, backend=backend, grad_output=_grad_output(fn, s, t, reduction), reduction=reduction)


@pytest.mark.parametrize("kind", ["distance", "angle"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_float64_matches_reference(backend, kind, reduction, teacher_grad):
    """float64 inputs are computed in float64 whatever the backend (docs/precision.md)."""
    fn, rfn = FNS[kind]
    device = require(backend, NAMES[kind])
    s, t = _inputs(11, 7, 5, F64, teacher_grad, device=device)
    go = _grad_output(fn, s, t, reduction)
    _check(fn, rfn, s, t, backend=backend, grad_output=go, reduction=reduction)


@pytest.mark.gpu
@pytest.mark.parametrize(("kind", "n", "d"), [("distance", 130, 96), ("angle", 130, 64), ("distance", 1000, 256)])
def test_large_n_on_gpu(backend, kind, n, d):
    """Many tiles per row (GPU only: the interpreter and the N^3 float64 reference are too slow on a CPU)."""
    fn, rfn = FNS[kind]
    device = require(backend, NAMES[kind])
    if device.type != "cuda":
        pytest.skip("no CUDA device (large-N cases run on a GPU only)")
    s, t = _inputs(n, d, d // 2 + 1, teacher_grad=True, device=device)
    for reduction in ("mean", "none"):
        _check(fn, rfn, s, t, backend=backend, grad_output=_grad_output(fn, s, t, reduction), reduction=reduction)


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_rkd_loss_matches_reference(backend, teacher_grad):
    device = require(backend, "rkd_loss")
    s, t = _inputs(16, 12, 20, teacher_grad=teacher_grad, device=device)
    go = torch.tensor(0.37, dtype=F64)
    _check(kd_kernels.rkd_loss, ref.rkd_loss, s, t, backend=backend, grad_output=go)
    _check(kd_kernels.rkd_loss, ref.rkd_loss, s.double(), t.double(), backend=backend, distance_weight=1.0, angle_weight=2.0)


@pytest.mark.parametrize("kind", ["distance", "angle"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_inputs(backend, kind, reduction):
    """Transposed and strided views are read through their strides."""
    fn, rfn = FNS[kind]
    device = require(backend, NAMES[kind])
    s = torch.randn(8, 21, device=device).T  # [21, 8], transposed view
    t = torch.randn(21, 15, device=device)[:, ::3]  # [21, 5], strided view
    assert not s.is_contiguous() and not t.is_contiguous()
    t.requires_grad_()
    _check(fn, rfn, s, t, backend=backend, grad_output=_grad_output(fn, s, t, reduction), reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["distance", "angle"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision(backend, kind, dtype, reduction):
    """The results have the inputs' dtypes; the 2x rule against the reference run in the same
    dtype, with the final rounding to the dtype as floor. Exception: the fp16 reference angle
    loss is NaN (F.normalize's eps 1e-12 underflows to 0 in fp16, so the zero difference vector
    x_a - x_a gives 0/0); there, the dtype's fallback tolerance against the float64 reference."""
    fn, rfn = FNS[kind]
    device = require(backend, NAMES[kind])
    s, t = _inputs(37, 24, 17, dtype, teacher_grad=True, device=device)
    go = _grad_output(fn, s.float(), t.float(), reduction)
    v, gs, gt = value_and_grads(lambda a, b, **k: fn(a, b, backend=backend, **k), s, t, grad_output=go, reduction=reduction)
    rv, rgs, rgt = value_and_grads(rfn, s, t, dtype=F64, grad_output=go, reduction=reduction)
    base = value_and_grads(rfn, s, t, grad_output=go, reduction=reduction)
    assert v.dtype == dtype and gs.dtype == dtype and gt.dtype == dtype
    for got, want, b, name in zip((v, gs, gt), (rv, rgs, rgt), base, ("value", "grad student", "grad teacher")):
        if kind == "angle" and dtype == torch.float16:
            assert b.isnan().any()
            _compare(got, want, tolerance(dtype, backend)[0], name)
        else:
            floor = 2 * low_precision_floor(dtype) * want.abs().max().item()
            assert_close_2x(got, want, b, name=name, floor=floor)


# ------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["distance", "angle"])
def test_duplicated_rows_match_reference(backend, kind, dtype, reduction):
    """Identical rows, in both networks (one pair inside a 32-row tile, one across tiles) and in
    one network only: the reference's value; the clamped distance 1e-6 has zero gradient, psi = 0
    on degenerate triples. Angle: where only one network has a zero difference, the reference's
    gradient for that network is F.normalize's 1/eps = 1e12 slope (ours is 0, see
    test_student_only_duplicate_angle), so the angle case duplicates in the teacher only, with no
    teacher gradient."""
    fn, rfn = FNS[kind]
    device = require(backend, NAMES[kind])
    s, t = _inputs(35, 6, 9, dtype, device=device)
    for x in (s, t):
        x[5], x[34] = x[2], x[0]
    t[30] = t[31]  # teacher only
    if kind == "distance":
        s[11] = s[20]  # student only
    t.requires_grad_(kind == "distance")
    _check(fn, rfn, s, t, backend=backend, grad_output=_grad_output(fn, s, t, reduction), reduction=reduction)


def test_student_only_duplicate_angle(backend):
    """Deviation (documented): where only the student has two identical rows, the reference's
    gradient on them is ~1/eps = 1e12 times a nonzero number (F.normalize of a zero vector);
    ours holds the degenerate psi = 0 constant. Values agree; the other rows' gradients agree."""
    device = require(backend, "rkd_angle_loss")
    s, t = _inputs(7, 4, 5, device=device)
    s[3] = s[1]
    v, gs, _ = value_and_grads(lambda a, b: losses.rkd_angle_loss(a, b, backend=backend), s, t)
    rv, rgs, _ = value_and_grads(ref.rkd_angle_loss, s, t, dtype=F64)
    assert_close(v, rv, name="value")
    keep = [0, 2, 4, 5, 6]
    _compare(gs[keep], rgs[keep], tolerance(s.dtype, backend)[0], "other rows' grads")
    assert rgs[1].abs().max() > 1e6 and gs[1].abs().max() < 1


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


def test_transposed_input_grads_are_contiguous():
    """The backward ops return contiguous gradients, as their fake kernels declare (the
    distance backward used to return a transposed student's strides: opcheck failed and
    torch.compile's inductor backward raised a stride assertion)."""
    s, t = torch.randn(8, 10).T, torch.randn(10, 5)[:, ::2]
    _, mu_s, mu_t = rkd_ops.rkd_distance_fwd(s, t, "mean", "torch")
    torch.library.opcheck(rkd_ops.rkd_distance_bwd, (torch.ones(()), s, t, mu_s, mu_t, "mean", True, True, "torch"))
    torch.library.opcheck(rkd_ops.rkd_angle_bwd, (torch.ones(()), s, t, "mean", True, True, "torch"))


def test_all_rows_identical(backend):
    s, t = torch.ones(5, 3).mul(0.3), torch.ones(5, 4)
    for kind in ("distance", "angle"):
        fn, rfn = FNS[kind]
        device = require(backend, NAMES[kind])
        _check(fn, rfn, s.to(device), t.to(device), backend=backend)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("kind", ["distance", "angle"])
def test_tiny_n_float64(backend, kind, n):
    """N = 2 angle: every non-degenerate triple is (a, b, b) with psi = 1 for both, so the loss
    and gradients are 0 up to rounding: compared absolutely."""
    fn, rfn = FNS[kind]
    device = require(backend, NAMES[kind])
    s, t = _inputs(n, 4, 3, F64, teacher_grad=True, device=device)
    v, gs, gt = value_and_grads(lambda a, b: fn(a, b, backend=backend), s, t)
    rv, rgs, rgt = value_and_grads(rfn, s, t, dtype=F64)
    for a, e, name in ((v, rv, "value"), (gs, rgs, "grad student"), (gt, rgt, "grad teacher")):
        assert_close(a, e, rtol=1e-9, atol=1e-12, name=name)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_angle_n1_is_zero(backend, dtype):
    """N = 1: the only triple is degenerate; loss 0 and zero gradients, as the reference."""
    device = require(backend, "rkd_angle_loss")
    s, t = _inputs(1, 4, 3, dtype, teacher_grad=True, device=device)
    for reduction in REDUCTIONS:
        fn = lambda a, b, **k: losses.rkd_angle_loss(a, b, backend=backend, **k)
        v, gs, gt = value_and_grads(fn, s, t, reduction=reduction)
        rv, rgs, rgt = value_and_grads(ref.rkd_angle_loss, s, t, reduction=reduction, dtype=F64)
        assert_close(v, rv, atol=0, rtol=0)
        assert_close(gs, rgs, atol=0, rtol=0)
        assert_close(gt, rgt, atol=0, rtol=0)
        assert v.abs().max() == 0


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
