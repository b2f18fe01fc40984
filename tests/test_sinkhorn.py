"""SinKD (sinkhorn_loss) and batched log-domain Sinkhorn (sinkhorn): the PyTorch path against
the float64 references, gradcheck, opcheck, torch.compile, edge cases and input validation."""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels.losses.sinkhorn import SinkhornLoss, sinkhorn, sinkhorn_loss
from kd_kernels.ops import sinkhorn as ops
from kd_kernels.reference import sinkhorn as reference
from kd_kernels.testing import assert_close, assert_matches_reference, require, value_and_grads
from kd_kernels.torch_impl import sinkhorn as torch_impl

ref_loss = reference.sinkhorn_loss
ref_ot = reference.sinkhorn
F64 = torch.float64
F32 = torch.float32


def logits(b: int, c: int, dtype=F32, scale: float = 2.0, device="cpu"):
    return scale * torch.randn(b, c, dtype=dtype, device=device), scale * torch.randn(b, c, dtype=dtype, device=device)


# ------------------------------------------------------------------------- SinKD vs reference


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("b, c", [(1, 3), (2, 2), (3, 5), (16, 3), (32, 2), (7, 1), (5, 41)])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_sinkhorn_loss_matches_reference(backend, dtype, b, c, teacher_grad):
    s, t = logits(b, c, dtype, device=require(backend, "sinkhorn_loss"))
    t.requires_grad_(teacher_grad)
    assert_matches_reference(sinkhorn_loss, ref_loss, s, t, name=f"sinkd B={b} C={c}", backend=backend)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize(
    "kwargs", [{"n_iters": 1}, {"n_iters": 2, "epsilon": 0.5}, {"temperature": 1.0, "epsilon": 0.05, "n_iters": 50}]
)
def test_sinkhorn_loss_flags(backend, dtype, kwargs):
    s, t = logits(9, 3, dtype, device=require(backend, "sinkhorn_loss"))
    t.requires_grad_(True)
    assert_matches_reference(sinkhorn_loss, ref_loss, s, t, grad_output=torch.tensor(0.37), backend=backend, **kwargs)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_sinkhorn_loss_duplicated_rows(backend, dtype):
    s, t = logits(6, 4, dtype, device=require(backend, "sinkhorn_loss"))
    s[3] = s[1]  # duplicated student rows
    t[2] = s[2]  # identical student/teacher row: D_22 = 0 exactly, sign(0) = 0 in both paths
    t[5] = t[0]
    t.requires_grad_(True)
    assert_matches_reference(sinkhorn_loss, ref_loss, s, t, name="duplicated rows", backend=backend)


def test_sinkhorn_loss_identical_batches(backend):
    # student == teacher: D has a zero diagonal, every sign is taken at a tie somewhere.
    s, _ = logits(5, 3, F64, device=require(backend, "sinkhorn_loss"))
    t = s.clone().requires_grad_(True)
    assert_matches_reference(sinkhorn_loss, ref_loss, s, t, backend=backend)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_sinkhorn_loss_tiled_cdist(dtype, monkeypatch):
    # A tiny tile budget forces several row tiles and several class tiles (odd C, odd B).
    monkeypatch.setattr(torch_impl, "TILE_ELEMS", 7 * 3 * 2)
    s, t = logits(7, 13, dtype)
    t.requires_grad_(True)
    assert_matches_reference(sinkhorn_loss, ref_loss, s, t, name="tiled")
    monkeypatch.setattr(torch_impl, "TILE_ELEMS", 5)  # fewer elements than one row of D
    assert_matches_reference(sinkhorn_loss, ref_loss, s, t, name="row tiles")


@pytest.mark.parametrize("dtype", [F64, F32])
def test_sinkhorn_loss_non_contiguous(backend, dtype):
    device = require(backend, "sinkhorn_loss")
    s = torch.randn(5, 8, dtype=dtype, device=device).t()  # [8, 5] transposed view
    t = torch.randn(16, 5, dtype=dtype, device=device)[::2].requires_grad_(True)  # strided rows
    assert not s.is_contiguous() and not t.is_contiguous()
    assert_matches_reference(sinkhorn_loss, ref_loss, s, t, grad_output=torch.tensor(0.37), backend=backend)


def test_sinkhorn_loss_teacher_without_grad_gets_none():
    s, t = logits(4, 3)
    s.requires_grad_(True)
    sinkhorn_loss(s, t).backward()
    assert t.grad is None and s.grad is not None
    # teacher-only gradient: the student gets none
    s2, t2 = logits(4, 3)
    t2.requires_grad_(True)
    sinkhorn_loss(s2, t2).backward()
    assert s2.grad is None and t2.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinkhorn_loss_low_precision(backend, dtype):
    s, t = logits(16, 3, dtype, device=require(backend, "sinkhorn_loss"))
    t.requires_grad_(True)
    v, gs, gt = value_and_grads(lambda a, b: sinkhorn_loss(a, b, backend=backend), s, t)
    assert v.dtype == dtype and gs.dtype == dtype and gt.dtype == dtype
    rv, rgs, rgt = value_and_grads(ref_loss, s, t, dtype=F64)  # same rounded inputs, exact math
    # Computed in float32 from the rounded inputs: only the final cast to `dtype` rounds.
    assert_close(v, rv, name="value")
    assert_close(gs, rgs, atol=1e-3 if dtype == torch.float16 else 5e-3, name="grad student")
    assert_close(gt, rgt, atol=1e-3 if dtype == torch.float16 else 5e-3, name="grad teacher")


def test_sinkhorn_loss_mixed_dtypes():
    s = torch.randn(6, 3, dtype=torch.bfloat16)
    t = torch.randn(6, 3, dtype=F32).requires_grad_(True)
    v, gs, gt = value_and_grads(sinkhorn_loss, s, t)
    assert v.dtype == torch.bfloat16 and gs.dtype == torch.bfloat16 and gt.dtype == F32
    _, _, rgt = value_and_grads(ref_loss, s, t, dtype=F64)
    assert_close(gt, rgt, rtol=1e-4, atol=1e-6, name="grad teacher")


def test_sinkhorn_loss_gradcheck():
    s = torch.randn(3, 4, dtype=F64, requires_grad=True)
    t = torch.randn(3, 4, dtype=F64, requires_grad=True)

    def fn(a, b):
        return sinkhorn_loss(a, b, epsilon=0.3, n_iters=4)

    assert torch.autograd.gradcheck(fn, (s, t))


def test_sinkhorn_loss_module_equals_function():
    s, t = logits(8, 3, F64)
    kw = {"temperature": 1.5, "epsilon": 0.2, "n_iters": 7}
    mod = SinkhornLoss(**kw)
    assert_close(mod(s, t), sinkhorn_loss(s, t, **kw), rtol=0, atol=0)
    assert "n_iters=7" in repr(mod)
    assert kd_kernels.SinkhornLoss is SinkhornLoss and kd_kernels.sinkhorn_loss is sinkhorn_loss


def test_sinkhorn_loss_plan_state_is_small():
    # The forward saves D [B, B] and the per-iteration scale vectors only.
    s, t = logits(5, 300)
    loss, cost, u, v = ops.sinkhorn_loss_fwd(s, t, 2.0, 0.1, 20, "torch")
    assert cost.shape == (5, 5) and u.shape == (21, 5) and v.shape == (21, 5)
    # And X_L = diag(u_L) K diag(v_L) is the reference's plan: column sums are exactly 1.
    plan = u[-1, :, None] * torch.exp(-cost / 0.1) * v[-1, None, :]
    assert_close(plan.sum(0), torch.ones(5), rtol=1e-6, atol=1e-6)
    assert_close(loss, (plan * cost).sum(), rtol=1e-6)


# ------------------------------------------------------------------------- Sinkhorn vs reference


def marginals(shape, dtype=F64):
    w = torch.rand(*shape, dtype=dtype) + 0.2
    return w / w.sum(-1, keepdim=True)


def ot_value_and_grads(fn, cost, a, b, grad_output, dtype=None, **kw):
    leaves = []
    for x in (cost, a, b):
        leaves.append(None if x is None else x.detach().to(dtype or x.dtype).requires_grad_(x.requires_grad))
    out = fn(leaves[0], a=leaves[1], b=leaves[2], **kw)
    out.backward(grad_output.to(out.dtype))
    return out.detach(), [None if x is None else x.grad for x in leaves]


def check_ot(cost, a=None, b=None, rtol=None, atol=None, backend="torch", **kw):
    g = torch.randn(cost.shape, dtype=F64, device=cost.device)
    v, grads = ot_value_and_grads(sinkhorn, cost, a, b, g, backend=backend, **kw)
    rv, rgrads = ot_value_and_grads(ref_ot, cost, a, b, g, dtype=F64, **kw)
    assert v.dtype == cost.dtype and v.shape == cost.shape
    assert_close(v, rv, rtol=rtol, atol=atol, name="plan")
    for name, x, y in zip(("cost", "a", "b"), grads, rgrads, strict=True):
        assert_close(x, y, rtol=rtol, atol=atol, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape", [(2, 5, 4), (3, 1, 6), (1, 7, 7), (5, 4), (1, 1)])
def test_sinkhorn_matches_reference(backend, dtype, shape):
    cost = torch.rand(*shape, dtype=dtype, device=require(backend, "sinkhorn")).requires_grad_(True)
    # fp32: 1e-4, looser than the table's 2e-5: the 1/epsilon = 10 factors of 30 log-domain
    # iterations amplify the fp32 rounding of the potentials.
    tol = {} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-5}
    check_ot(cost, epsilon=0.1, n_iters=30, backend=backend, **tol)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("batched_marginals", [False, True])
def test_sinkhorn_marginals(backend, dtype, batched_marginals):
    device = require(backend, "sinkhorn")
    nb, n, m = 3, 6, 5
    cost = torch.rand(nb, n, m, dtype=dtype, device=device).requires_grad_(True)
    a = marginals((nb, n) if batched_marginals else (n,), dtype).to(device).requires_grad_(True)
    b = marginals((nb, m) if batched_marginals else (m,), dtype).to(device)  # constant: no grad requested
    tol = {"rtol": None, "atol": None} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-5}
    check_ot(cost, a, b, epsilon=0.2, n_iters=25, backend=backend, **tol)
    b_grad = b.requires_grad_(True)
    check_ot(cost.detach(), a.detach(), b_grad, epsilon=0.2, n_iters=3, backend=backend, **tol)  # b grad only


@pytest.mark.parametrize("dtype", [F64, F32])
def test_sinkhorn_zero_marginal_entries(dtype):
    # Regression: a zero-mass row or column (e.g. padding) made the whole cost gradient NaN
    # ((-inf) - log 0 in the backward), where autograd through the reference loop is finite.
    cost = torch.rand(3, 4, 5, dtype=dtype).requires_grad_(True)
    a = torch.tensor([0.0, 0.4, 0.3, 0.3], dtype=dtype).requires_grad_(True)
    b = marginals((3, 5), dtype)
    b[0, 2], b[1, 0] = 0.0, 0.0
    b.requires_grad_(True)
    g = torch.randn(cost.shape, dtype=F64)
    v, grads = ot_value_and_grads(sinkhorn, cost, a, b, g, epsilon=0.2, n_iters=8)
    rv, rgrads = ot_value_and_grads(ref_ot, cost, a, b, g, dtype=F64, epsilon=0.2, n_iters=8)
    tol = {} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-5}
    assert_close(v, rv, **tol, name="plan")
    assert torch.isfinite(grads[0]).all()
    assert_close(grads[0], rgrads[0], **tol, name="grad cost")
    for x, y, name in ((grads[1], rgrads[1], "a"), (grads[2], rgrads[2], "b")):
        keep = torch.isfinite(y)  # NaN exactly at the zero entries (0 / 0), as the reference
        assert torch.equal(torch.isfinite(x), keep)
        assert_close(x[keep], y[keep], **tol, name=f"grad {name}")


def test_sinkhorn_column_marginals_exact():
    # After the final g-update, column sums are exactly b (up to rounding); rows approach a.
    cost = torch.rand(4, 8, 9, dtype=F64)
    a, b = marginals((4, 8)), marginals((4, 9))
    plan = sinkhorn(cost, a=a, b=b, epsilon=0.5, n_iters=200)
    assert_close(plan.sum(1), b, rtol=1e-12, atol=1e-14)
    assert_close(plan.sum(2), a, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n_iters", [1, 2])
def test_sinkhorn_few_iters_and_grad_output(n_iters):
    cost = torch.rand(2, 4, 3, dtype=F64).requires_grad_(True)
    check_ot(cost, epsilon=0.05, n_iters=n_iters)


def test_sinkhorn_small_epsilon_is_stable():
    # Log domain: eps = 1e-3 on costs ~1 would underflow exp(-C/eps) in the plain domain.
    cost = torch.rand(2, 6, 6, dtype=F32).requires_grad_(True)
    plan = sinkhorn(cost, epsilon=1e-3, n_iters=20)
    assert torch.isfinite(plan).all()
    assert_close(plan, ref_ot(cost.double(), epsilon=1e-3, n_iters=20), rtol=1e-3, atol=1e-5)
    # The gradient carries 1/eps = 1000 factors: compare it in float64.
    check_ot(cost.detach().double().requires_grad_(True), epsilon=1e-3, n_iters=20, rtol=1e-7, atol=1e-9)


def test_sinkhorn_non_contiguous(backend):
    device = require(backend, "sinkhorn")
    cost = torch.rand(3, 5, 6, dtype=F64, device=device).transpose(1, 2).requires_grad_(True)  # [3, 6, 5] view
    b = marginals((10,)).to(device)[::2]  # strided [5]
    check_ot(cost, None, b.requires_grad_(True), epsilon=0.1, n_iters=10, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinkhorn_low_precision(backend, dtype):
    cost = torch.rand(2, 6, 5, device=require(backend, "sinkhorn")).to(dtype).requires_grad_(True)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    check_ot(cost, epsilon=0.1, n_iters=20, rtol=tol, atol=tol, backend=backend)


def test_sinkhorn_gradcheck():
    cost = torch.rand(2, 3, 4, dtype=F64, requires_grad=True)
    a = marginals((3,)).requires_grad_(True)
    b = marginals((2, 4)).requires_grad_(True)

    def fn(c, a, b):
        return sinkhorn(c, a=a, b=b, epsilon=0.2, n_iters=5)

    assert torch.autograd.gradcheck(fn, (cost, a, b))


def test_sinkhorn_only_needed_grads():
    cost = torch.rand(2, 3, 4)
    a = marginals((3,), F32).requires_grad_(True)
    sinkhorn(cost, a=a, n_iters=5).sum().backward()
    assert cost.grad is None and a.grad is not None


# ------------------------------------------------------------------------- opcheck and compile


def test_opcheck_sinkhorn_loss_ops():
    for dtype, (b, c) in ((F32, (4, 3)), (F64, (1, 2)), (torch.bfloat16, (5, 7))):
        s, t = logits(b, c, dtype)
        torch.library.opcheck(ops.sinkhorn_loss_fwd, (s.requires_grad_(), t, 2.0, 0.1, 5, "torch"))
        torch.library.opcheck(ops.sinkhorn_loss_fwd, (s, t.requires_grad_(), 1.5, 0.2, 1, "torch"))
        _, cost, u, v = ops.sinkhorn_loss_fwd(s.detach(), t.detach(), 2.0, 0.1, 5, "torch")
        g = torch.tensor(0.37, dtype=dtype)
        for need in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(
                ops.sinkhorn_loss_bwd, (g, s.detach(), t.detach(), cost, u, v, 2.0, 0.1, *need, "torch")
            )


def test_opcheck_sinkhorn_ops():
    for dtype, (nb, n, m) in ((F32, (2, 4, 3)), (F64, (1, 1, 5)), (torch.float16, (3, 5, 5))):
        cost = torch.rand(nb, n, m, dtype=dtype)
        a, b = marginals((nb, n), F32), marginals((nb, m), F32)
        for tol, implicit in ((0.0, False), (1e-3, False), (1e-3, True)):
            extra = (tol, 2, implicit, "torch")
            torch.library.opcheck(ops.sinkhorn_fwd, (cost.requires_grad_(), a, b, 0.1, 4, *extra))
            torch.library.opcheck(
                ops.sinkhorn_fwd, (cost.detach(), a.requires_grad_(), b.requires_grad_(), 0.3, 1, *extra)
            )
            _, al, be, n_run = ops.sinkhorn_fwd(cost.detach(), a.detach(), b.detach(), 0.1, 4, *extra)
            g = torch.randn(nb, n, m, dtype=dtype)
            for need in ((True, False, False), (True, True, True), (False, False, True)):
                args = (g, cost.detach(), a.detach(), b.detach(), al, be, n_run, 0.1, 4, implicit, *need, "torch")
                torch.library.opcheck(ops.sinkhorn_bwd, args)


def _compiled_matches(fn, inputs, grad_output, backend, **kw):
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: fn(*x, **kw), fullgraph=True, backend=backend)
    leaves_e = [x.detach().clone().requires_grad_(True) for x in inputs]
    leaves_c = [x.detach().clone().requires_grad_(True) for x in inputs]
    eager = fn(*leaves_e, **kw)
    eager.backward(grad_output)
    comp = compiled(*leaves_c)
    comp.backward(grad_output)
    assert_close(comp, eager, rtol=1e-5, atol=1e-6, name="compiled value")
    for x, y in zip(leaves_c, leaves_e, strict=True):
        assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6, name="compiled grad")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_sinkhorn_loss_compiles(backend):
    s, t = logits(6, 3)
    _compiled_matches(sinkhorn_loss, [s, t], torch.tensor(0.37), backend, epsilon=0.2, n_iters=5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_sinkhorn_compiles(backend):
    cost = torch.rand(2, 5, 4)
    _compiled_matches(sinkhorn, [cost], torch.randn(2, 5, 4), backend, n_iters=5)
    if backend == "aot_eager":
        _compiled_matches(
            lambda c, a: sinkhorn(c, a=a, n_iters=3),
            [torch.rand(5, 4), marginals((5,), F32)],
            torch.randn(5, 4),
            backend,
        )


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((torch.randn(3), torch.randn(3)), {}, ValueError, "student_logits"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4)), {}, ValueError, "student_logits"),
        ((torch.randn(3, 4), torch.randn(4, 4)), {}, ValueError, "teacher_logits"),
        ((torch.randn(3, 4), torch.randn(3, 5)), {}, ValueError, "teacher_logits"),
        ((torch.randn(3, 4), torch.randn(3, 4, device="meta")), {}, ValueError, "device|teacher_logits"),
        ((torch.randint(0, 3, (3, 4)), torch.randn(3, 4)), {}, TypeError, "student_logits"),
        ((torch.randn(3, 4), torch.randn(3, 4).numpy()), {}, TypeError, "teacher_logits"),
        ((torch.randn(0, 4), torch.randn(0, 4)), {}, ValueError, "N >= 1"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"temperature": 0.0}, ValueError, "temperature"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"epsilon": -0.1}, ValueError, "epsilon"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"epsilon": torch.tensor(0.1)}, TypeError, "epsilon"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"n_iters": 0}, ValueError, "n_iters"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"n_iters": 2.0}, TypeError, "n_iters"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"backend": "fastest"}, ValueError, "backend"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"backend": "cuda"}, ValueError, "cuda"),
    ],
)
def test_sinkhorn_loss_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sinkhorn_loss(*args, **kwargs)


@pytest.mark.parametrize(
    "cost, kwargs, exc, match",
    [
        (torch.rand(4), {}, ValueError, "cost"),
        (torch.rand(2, 2, 3, 3), {}, ValueError, "cost"),
        (torch.rand(2, 0, 3), {}, ValueError, "n >= 1"),
        (torch.randint(0, 3, (2, 3)), {}, TypeError, "cost"),
        ([[0.0, 1.0]], {}, TypeError, "cost"),
        (torch.rand(2, 3), {"epsilon": 0}, ValueError, "epsilon"),
        (torch.rand(2, 3), {"n_iters": 0}, ValueError, "n_iters"),
        (torch.rand(2, 3), {"n_iters": True}, TypeError, "n_iters"),
        (torch.rand(2, 3), {"a": torch.rand(3)}, ValueError, r"a must have shape \[2\]"),
        (torch.rand(2, 3), {"a": torch.rand(1, 3)}, ValueError, r"a must have shape \[2\] or \[1, 2\]"),
        (torch.rand(4, 2, 3), {"b": torch.rand(4, 2)}, ValueError, r"b must have shape \[3\] or \[4, 3\]"),
        (torch.rand(4, 2, 3), {"b": torch.rand(5, 3)}, ValueError, "b must have shape"),
        (torch.rand(2, 3), {"b": torch.ones(3, dtype=torch.int64)}, TypeError, "b must be"),
        (torch.rand(2, 3), {"a": torch.rand(2, device="meta")}, ValueError, "a is on meta"),
        (torch.rand(2, 3), {"backend": "fastest"}, ValueError, "backend"),
        (torch.rand(2, 3), {"backend": "cuda"}, ValueError, "cuda"),
    ],
)
def test_sinkhorn_bad_input(cost, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sinkhorn(cost, **kwargs)


# ---- tol (stopping on the device) and grad="implicit" -------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_sinkhorn_tol_stops_each_problem_like_a_fixed_run(backend, shared):
    device = require(backend, "sinkhorn")
    nb, n, m = 4, 7, 5
    cost = (torch.rand(n, m, dtype=F64, device=device) if shared else torch.rand(nb, n, m, dtype=F64, device=device))
    eps = torch.tensor([2.0, 0.5, 0.2, 0.05]).tolist()[0]  # one epsilon; problems differ by cost / marginals
    a = marginals((nb, n), F64).to(device)
    b = (a.sum(1, keepdim=True) * marginals((nb, m), F64)).to(device)
    c = cost.to(F32)
    plan, n_run = sinkhorn(c, epsilon=eps, n_iters=200, a=a.to(F32), b=b.to(F32), tol=1e-4, check_every=3,
                           return_n_iters=True, backend=backend)  # fmt: skip
    assert n_run.dtype == torch.int32 and n_run.shape == (nb,)
    assert (n_run < 200).all() and (n_run % 3 == 0).all(), n_run
    for i in range(nb):
        ci = cost if shared else cost[i]
        want = ref_ot(ci, epsilon=eps, n_iters=int(n_run[i]), a=a[i], b=b[i])
        assert_close(plan[i].to(F64), want, rtol=1e-4, atol=1e-6)
        # the problem was really converged to tol, and one check earlier it was not
        err = (want.sum(1) - a[i]).abs().sum()
        assert err <= 1.5e-4, err
        if int(n_run[i]) > 3:
            early = ref_ot(ci, epsilon=eps, n_iters=int(n_run[i]) - 3, a=a[i], b=b[i])
            assert (early.sum(1) - a[i]).abs().sum() > 0.5e-4


def test_sinkhorn_tol_none_runs_every_iteration(backend):
    device = require(backend, "sinkhorn")
    cost = torch.rand(3, 4, 6, device=device)
    plan, n_run = sinkhorn(cost, n_iters=7, return_n_iters=True, backend=backend)
    assert n_run.tolist() == [7, 7, 7]
    assert_close(plan, sinkhorn(cost, n_iters=7, tol=1e-30, backend=backend), rtol=1e-5, atol=1e-7)


def test_sinkhorn_tol_gradient_is_that_of_the_iterations_run(backend):
    device = require(backend, "sinkhorn")
    cost = torch.rand(2, 5, 4, dtype=F32, device=device)
    w = torch.randn(2, 5, 4, dtype=F32, device=device)
    c1 = cost.clone().requires_grad_()
    plan, n_run = sinkhorn(c1, epsilon=0.5, n_iters=60, tol=1e-5, check_every=2, return_n_iters=True, backend=backend)
    (plan * w).sum().backward()
    for i in range(2):
        c2 = cost[i].to(F64).requires_grad_()
        (ref_ot(c2, epsilon=0.5, n_iters=int(n_run[i])) * w[i].to(F64)).sum().backward()
        assert_close(c1.grad[i].to(F64), c2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_sinkhorn_implicit_gradient_matches_unrolled_at_convergence(backend, dtype):
    device = require(backend, "sinkhorn")
    nb, n, m = 3, 6, 9
    cost = torch.rand(nb, n, m, dtype=dtype, device=device)
    a = marginals((nb, n), dtype).to(device)
    b = marginals((nb, m), dtype).to(device)
    w = torch.randn(nb, n, m, dtype=dtype, device=device)
    grads = {}
    for mode in ("unrolled", "implicit"):
        c = cost.clone().requires_grad_()
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        plan = sinkhorn(c, epsilon=0.3, n_iters=300, a=aa, b=bb, grad=mode, backend=backend)
        (plan * w).sum().backward()
        grads[mode] = (plan.detach(), c.grad, aa.grad, bb.grad)
    tol = 1e-10 if dtype == F64 else 2e-5
    for got, want in zip(grads["implicit"], grads["unrolled"], strict=True):
        assert_close(got, want, rtol=tol, atol=tol)


def test_sinkhorn_implicit_gradient_differs_before_convergence():
    # a test that can fail: with few iterations the two gradients are different quantities
    cost = torch.rand(2, 5, 6, dtype=F64)
    w = torch.randn(2, 5, 6, dtype=F64)
    out = []
    for mode in ("unrolled", "implicit"):
        c = cost.clone().requires_grad_()
        (sinkhorn(c, epsilon=0.05, n_iters=2, grad=mode) * w).sum().backward()
        out.append(c.grad)
    assert (out[0] - out[1]).abs().max() > 1e-6


@pytest.mark.parametrize("kwargs, match", [
    ({"tol": 0.0}, "tol must be"), ({"tol": -1.0}, "tol must be"), ({"tol": "1e-3"}, "tol must be"),
    ({"grad": "envelope"}, "grad must be one of"), ({"check_every": 0}, "check_every"),
])  # fmt: skip
def test_sinkhorn_tol_grad_arguments_are_checked(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sinkhorn(torch.rand(2, 3, 3), **kwargs)
