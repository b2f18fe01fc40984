"""Triton batched log-domain Sinkhorn (kd_kernels/triton/sinkhorn.py): the launchers against the
float64 torch path of the same op contract (kd_kernels.torch_impl.sinkhorn.sinkhorn_fwd/_bwd:
tol, check_every, implicit), beyond the public backend matrix of tests/test_sinkhorn.py.

Under TRITON_INTERPRET=1 the "interpret" config has 8-column tiles, whole-row tiles up to 16
columns and 2 problems per program for a shared cost, so m = 13 is the single-tile path (two row
blocks per program), m = 20 the two-sweep path over three column tiles, n = 33 several row
programs, and B = 3 / 17 ragged problem groups."""

from __future__ import annotations

import pytest
import torch

from kd_kernels.testing import assert_close, assert_close_2x, backend_device, backend_skip_reason, low_precision_floor
from kd_kernels.torch_impl import sinkhorn as T

_SKIP = backend_skip_reason("triton")
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

F64 = torch.float64
G = 0.37  # grad_output scale != 1


def _launchers():
    from kd_kernels.triton.sinkhorn import sinkhorn_bwd_triton, sinkhorn_fwd_triton

    return sinkhorn_fwd_triton, sinkhorn_bwd_triton


def _dev():
    return backend_device("triton")


def _problem(bsz, n, m, *, uniform=False, scale=1.0, dtype=torch.float32):
    dev = _dev()
    cost = (torch.rand(bsz, n, m, device=dev) * scale).to(dtype)
    if uniform:
        a = torch.full((bsz, n), 1.0 / n, device=dev)
        b = torch.full((bsz, m), 1.0 / m, device=dev)
    else:
        a = torch.rand(bsz, n, device=dev) + 0.2
        b = torch.rand(bsz, m, device=dev) + 0.2
        a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return cost, a, b


def _rel(x, ref, rtol):
    """Tolerances relative to the reference's largest entry (gradients carry 1/eps factors)."""
    return {"rtol": rtol, "atol": rtol * ref.detach().abs().max().item() + 1e-12}


def _run(cost, a, b, eps, n_iters, tol=0.0, check_every=1, implicit=False, grad=None, needs=(True, True, True)):
    """Kernel and float64 reference: forward outputs and backward gradients of both."""
    fwd, bwd = _launchers()
    out = fwd(cost, a, b, eps, n_iters, tol, check_every, implicit)
    ref = T.sinkhorn_fwd(cost.to(F64), a.to(F64), b.to(F64), eps, n_iters, tol, check_every, implicit)
    if grad is None:
        grad = torch.randn(cost.shape, device=cost.device) * G
    gk = bwd(grad.to(cost.dtype), cost, a, b, out[1], out[2], out[3], eps, n_iters, implicit, *needs)
    gr = T.sinkhorn_bwd(grad.to(F64), cost.to(F64), a.to(F64), b.to(F64), ref[1], ref[2], ref[3], eps, n_iters,
                        implicit, *needs)  # fmt: skip
    return out, ref, gk, gr


def _check(out, ref, gk, gr, rtol=1e-4, grad_rtol=2e-4, skip_marginal_grads=None):
    plan, alphas, betas, n_run = out
    assert alphas.dtype == betas.dtype == torch.float32 and n_run.dtype == torch.int32
    assert alphas.shape == ref[1].shape and betas.shape == ref[2].shape
    assert torch.equal(n_run.cpu(), ref[3].cpu()), f"n_run {n_run.tolist()} != reference {ref[3].tolist()}"
    assert_close(plan, ref[0], **_rel(plan, ref[0], rtol), name="plan")
    fin_a, fin_b = torch.isfinite(ref[1]), torch.isfinite(ref[2])
    assert torch.equal(torch.isfinite(alphas).cpu(), fin_a.cpu()) and torch.equal(
        torch.isfinite(betas).cpu(), fin_b.cpu()
    )
    # potentials: absolute error relative to their scale (log-domain values of size ~ 1/eps)
    assert_close(alphas[fin_a], ref[1][fin_a], **_rel(alphas, ref[1][fin_a], rtol), name="alphas")
    assert_close(betas[fin_b], ref[2][fin_b], **_rel(betas, ref[2][fin_b], rtol), name="betas")
    for i, name in enumerate(("cost", "a", "b")):
        if gr[i] is None:
            assert gk[i] is None, f"grad {name} should be None"
            continue
        x, y = gk[i], gr[i]
        assert x.shape == y.shape
        if i > 0 and skip_marginal_grads is not None:
            keep = skip_marginal_grads[i - 1]
            x, y = x[keep], y[keep]
        assert_close(x, y, **_rel(x, y, grad_rtol), name=f"grad {name}")


@pytest.mark.parametrize(
    ("bsz", "n", "m", "eps", "uniform"),
    [(1, 7, 13, 0.1, False), (3, 33, 20, 1.0, True), (17, 5, 3, 0.1, False), (3, 7, 13, 0.01, False),
     (2, 20, 7, 0.01, True), (1, 1, 2, 0.5, False)],
)  # fmt: skip
def test_unrolled_matches_reference(bsz, n, m, eps, uniform):
    torch.manual_seed(bsz * 1000 + n * 10 + m)
    cost, a, b = _problem(bsz, n, m, uniform=uniform)
    out, ref, gk, gr = _run(cost, a, b, eps, 9)
    assert out[0].shape == (bsz, n, m) and out[1].shape == (9, bsz, n) and out[3].tolist() == [9] * bsz
    assert out[0].dtype == cost.dtype and gk[0].dtype == cost.dtype and gk[1].dtype == a.dtype
    assert torch.isfinite(out[0]).all(), "the log domain must stay finite"
    # eps = 0.01: 1/eps = 100 amplifies the fp32 rounding of C / eps in every potential
    _check(out, ref, gk, gr, rtol=1e-4 if eps >= 0.1 else 5e-4, grad_rtol=2e-4 if eps >= 0.1 else 2e-3)


@pytest.mark.parametrize("m", [13, 20])
def test_shared_cost_and_marginals(m):
    # one [n, m] cost expanded over B (stride 0, never materialised), b expanded too
    torch.manual_seed(m)
    dev = _dev()
    bsz, n = 3, 9
    cost = torch.rand(n, m, device=dev).expand(bsz, n, m)
    a = torch.rand(bsz, n, device=dev) + 0.1
    a = a / a.sum(1, keepdim=True)
    b = torch.full((1, m), 1.0 / m, device=dev).expand(bsz, m)
    assert cost.stride(0) == 0 and b.stride(0) == 0
    out, ref, gk, gr = _run(cost, a, b, 0.1, 7)
    _check(out, ref, gk, gr)
    # and the same numbers as the materialised cost
    fwd, _ = _launchers()
    dense = fwd(cost.contiguous(), a, b.contiguous(), 0.1, 7, 0.0, 1, False)
    assert_close(out[0], dense[0], rtol=1e-6, atol=1e-9, name="shared vs dense plan")


@pytest.mark.parametrize("m", [13, 20])
def test_zero_marginal_entries(m):
    torch.manual_seed(3 + m)
    cost, a, b = _problem(3, 7, m)
    a[0, 2] = 0.0
    a[2, 6] = 0.0
    b[1, 4] = 0.0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    out, ref, gk, gr = _run(cost, a, b, 0.2, 8)
    assert torch.isfinite(gk[0]).all(), "a zero marginal entry must not put NaN into the cost gradient"
    assert (out[0][0, 2] == 0).all() and (out[0][1, :, 4] == 0).all()
    assert torch.isneginf(out[1][:, 0, 2]).all() and torch.isneginf(out[2][:, 1, 4]).all()
    _check(out, ref, gk, gr, skip_marginal_grads=(a > 0, b > 0))


def test_tol_freezes_easy_problems():
    # problem 0 is easy (small costs, eps = 1: converges in a few iterations), problem 1 hard
    # (eps / cost range = 0.02): it never reaches tol and runs all iterations.
    torch.manual_seed(11)
    cost, a, b = _problem(2, 7, 13)
    cost[1] *= 50.0
    n_iters, tol, every = 30, 1e-4, 3
    out, ref, gk, gr = _run(cost, a, b, 1.0, n_iters, tol, every)
    n_run = out[3].tolist()
    assert n_run[0] < n_iters and n_run[0] % every == 0 and n_run[1] == n_iters, n_run
    _check(out, ref, gk, gr)
    # rows past n_run repeat the last potentials
    k = n_run[0]
    assert torch.equal(out[1][k:, 0], out[1][k - 1, 0].expand(n_iters - k, -1))
    # the row marginals are within tol, and the plan is the fixed-iteration run of n_run[0] steps
    err = (out[0][0].sum(1) - a[0]).abs().sum().item()
    assert err <= tol * 1.01
    fwd, _ = _launchers()
    fixed = fwd(cost[:1], a[:1], b[:1], 1.0, k, 0.0, 1, False)
    assert_close(out[0][:1], fixed[0], rtol=1e-6, atol=1e-9, name="plan vs fixed n_run iterations")


def test_tol_never_checked_without_tol():
    torch.manual_seed(5)
    cost, a, b = _problem(3, 7, 13)
    fwd, _ = _launchers()
    out = fwd(cost, a, b, 1.0, 10, 0.0, 1, False)
    assert out[3].tolist() == [10, 10, 10]
    # tol checks only at k < n_iters: n_iters = check_every never freezes
    out = fwd(cost, a, b, 1.0, 4, 1e3, 4, False)
    assert out[3].tolist() == [4, 4, 4]
    out = fwd(cost, a, b, 1.0, 4, 1e3, 2, False)
    assert out[3].tolist() == [2, 2, 2]


@pytest.mark.parametrize("tol", [0.0, 1e-5])
def test_implicit_matches_reference(tol):
    torch.manual_seed(17)
    cost, a, b = _problem(3, 9, 20, scale=0.5)
    out, ref, gk, gr = _run(cost, a, b, 0.5, 25, tol, 2, implicit=True)
    assert out[1].shape == (1, 3, 9) and out[2].shape == (1, 3, 20)
    if tol > 0:
        assert (out[3] < 25).all()
    _check(out, ref, gk, gr)


def test_implicit_close_to_unrolled_when_converged():
    torch.manual_seed(23)
    cost, a, b = _problem(2, 6, 10)
    fwd, bwd = _launchers()
    grad = torch.randn(cost.shape, device=cost.device)
    res = []
    for implicit in (False, True):
        _, al, be, nr = fwd(cost, a, b, 1.0, 60, 0.0, 1, implicit)
        res.append(bwd(grad, cost, a, b, al, be, nr, 1.0, 60, implicit, True, True, True))
    for x, y, name in zip(res[0], res[1], ("cost", "a", "b")):
        assert_close(y, x, **_rel(y, x, 1e-4), name=f"implicit vs unrolled grad {name}")


def test_only_needed_grads():
    torch.manual_seed(2)
    cost, a, b = _problem(3, 7, 20)
    for needs in ((False, True, False), (True, False, False), (False, False, True)):
        out, ref, gk, gr = _run(cost, a, b, 0.3, 5, needs=needs)
        _check(out, ref, gk, gr)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [13, 20])
def test_low_precision_cost_2x_rule(dtype, m):
    torch.manual_seed(31 + m)
    cost, a, b = _problem(3, 7, m, dtype=dtype)
    eps, n_iters = 0.1, 8
    out, ref, gk, gr = _run(cost, a, b, eps, n_iters)
    assert out[0].dtype == dtype and gk[0].dtype == dtype and out[1].dtype == torch.float32
    # plain PyTorch in the same dtype: the torch path on the fp16/bf16 inputs (fp32 inside)
    base = T.sinkhorn_fwd(cost, a, b, eps, n_iters)
    grad = torch.randn(cost.shape, device=cost.device)
    gk = _launchers()[1](grad.to(dtype), cost, a, b, out[1], out[2], out[3], eps, n_iters, False, True, True, True)
    gr = T.sinkhorn_bwd(grad.to(dtype).to(F64), cost.to(F64), a.to(F64), b.to(F64), ref[1], ref[2], ref[3], eps,
                        n_iters, False, True, True, True)  # fmt: skip
    gb = T.sinkhorn_bwd(grad.to(dtype), cost, a, b, base[1], base[2], base[3], eps, n_iters, False, True, True, True)
    floor = low_precision_floor(dtype)
    assert_close_2x(out[0], ref[0], base[0], name="plan", floor=floor * ref[0].abs().max().item())
    for x, y, z, name in zip(gk, gr, gb, ("cost", "a", "b")):
        assert_close_2x(x, y, z, name=f"grad {name}", floor=floor * y.abs().max().item())


def test_non_finite_cost_gives_non_finite_plan():
    torch.manual_seed(4)
    cost, a, b = _problem(3, 7, 20)
    cost[1, 3, 5] = float("nan")
    cost[2, 0, 0] = float("inf")
    cost[2, 1, :] = float("inf")
    fwd, bwd = _launchers()
    plan, al, be, nr = fwd(cost, a, b, 0.1, 5, 1e-3, 1, False)
    assert torch.isfinite(plan[0]).all()
    assert not torch.isfinite(plan[1]).all() and not torch.isfinite(plan[2]).all()
    assert nr[1].item() == 5, "a NaN error must never freeze a problem"
    gc, _, _ = bwd(torch.ones_like(plan), cost, a, b, al, be, nr, 0.1, 5, False, True, False, False)
    assert not torch.isfinite(gc[1]).all()


def test_bad_arguments():
    fwd, _ = _launchers()
    cost, a, b = _problem(1, 3, 4)
    with pytest.raises(ValueError, match="n_iters"):
        fwd(cost, a, b, 0.1, 0, 0.0, 1, False)
    with pytest.raises(ValueError, match="cost"):
        fwd(cost[0], a, b, 0.1, 3, 0.0, 1, False)
