"""The fused CPU Sinkhorn forward ``kd_kernels._C.sinkhorn_fwd_cpu`` (csrc/cpu/sinkhorn.cpp) and
its route: the "torch" backend of ``sinkhorn`` on CPU tensors calls it when the extension is
built, else the PyTorch code of kd_kernels/torch_impl/sinkhorn.py (forced here with
``ops.USE_CPU_KERNEL = False``). Both must return the same (plan, alphas, betas), which the
shared torch backward consumes. Float64 comparisons to 1e-12; float32 against the float64 oracle.
"""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels import _backend
from kd_kernels.losses.sinkhorn import sinkhorn, sinkhorn_loss
from kd_kernels.ops import sinkhorn as ops
from kd_kernels.reference import sinkhorn as reference
from kd_kernels.torch_impl import sinkhorn as torch_impl

F64 = torch.float64
def _torch_fwd(*args):
    """The PyTorch forward's (plan, alphas, betas): the kernel does the fixed-iteration contract."""
    return torch_impl.sinkhorn_fwd(*args)[:3]


NOT_BUILT = "kd_kernels._C has no sinkhorn_fwd_cpu (extension not built)"


def _kernel():
    ext = _backend.load_extension()
    return getattr(ext, "sinkhorn_fwd_cpu", None) if ext is not None else None


needs_kernel = pytest.mark.skipif(_kernel() is None, reason=NOT_BUILT)


def _problem(nb: int, n: int, m: int, dtype: torch.dtype, *, scale: float = 1.0, zero: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nb, n, 2, generator=g, dtype=F64)
    y = torch.randn(nb, m, 2, generator=g, dtype=F64)
    cost = (torch.cdist(x, y).pow(2) * scale).to(dtype)
    a = torch.rand(nb, n, generator=g, dtype=F64) + 0.1
    b = torch.rand(nb, m, generator=g, dtype=F64) + 0.1
    if zero:
        a[:, n // 2] = 0.0
        b[0, 0] = 0.0
    a = a / a.sum(1, keepdim=True)
    b = b / b.sum(1, keepdim=True)
    return cost, a.to(dtype), b.to(dtype)


def _assert_same(got, want, *, atol: float, rtol: float = 0.0, what: str = ""):
    for name, x, y in zip(("plan", "alphas", "betas"), got, want):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what} {name}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        assert torch.equal(torch.isneginf(x), torch.isneginf(y)), f"{what} {name}: -inf pattern differs"
        fin = torch.isfinite(y)
        assert torch.isfinite(x[fin]).all(), f"{what} {name}: non-finite where the torch path is finite"
        torch.testing.assert_close(x[fin], y[fin], atol=atol, rtol=rtol, msg=lambda m: f"{what} {name}: {m}")


@needs_kernel
@pytest.mark.parametrize("nb, n, m", [(1, 1, 1), (1, 5, 7), (3, 17, 29), (17, 33, 20), (2, 130, 67)])
@pytest.mark.parametrize("epsilon", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("zero", [False, True])
def test_kernel_matches_torch_path_float64(nb, n, m, epsilon, zero):
    cost, a, b = _problem(nb, n, m, F64, zero=zero and n > 1 and m > 1)
    got = _kernel()(cost, a, b, epsilon, 12)
    want = _torch_fwd(cost, a, b, epsilon, 12)
    # potentials are O(max C / eps): compare them relative to that scale
    _assert_same(got, want, atol=1e-12 * max(1.0, float(cost.max()) / epsilon), rtol=1e-12, what=f"eps={epsilon}")


@needs_kernel
def test_kernel_shared_cost_and_strided_marginals():
    """A cost expanded over the batch (stride 0) and expanded marginals, as sinkhorn() passes them."""
    cost, a, b = _problem(1, 19, 23, F64)
    nb = 6
    c = cost[0].expand(nb, 19, 23)
    a_e, b_e = a[0].expand(nb, 19), b[0].expand(nb, 23)
    got = _kernel()(c, a_e, b_e, 0.05, 9)
    want = _torch_fwd(c, a_e, b_e, 0.05, 9)
    _assert_same(got, want, atol=1e-11, rtol=1e-12, what="shared cost")
    # per-problem marginals with one shared cost
    _, a2, b2 = _problem(nb, 19, 23, F64, seed=3)
    _assert_same(
        _kernel()(c, a2, b2, 0.05, 9), _torch_fwd(c, a2, b2, 0.05, 9), atol=1e-11, rtol=1e-12
    )


@needs_kernel
def test_kernel_column_underflow_fallback():
    """eps small against a large cost: early column sums of the row pass's exponentials underflow
    and must be recomputed exactly in the log domain (the result stays equal to the torch path)."""
    cost, a, b = _problem(3, 40, 31, F64, scale=30.0, zero=True, seed=5)
    for eps in (0.01, 0.002):
        got = _kernel()(cost, a, b, eps, 15)
        want = _torch_fwd(cost, a, b, eps, 15)
        _assert_same(got, want, atol=1e-12 * float(cost.max()) / eps, rtol=1e-12, what=f"underflow eps={eps}")
        assert torch.isfinite(got[0]).all()
        torch.testing.assert_close(got[0].sum(1), b, atol=1e-9, rtol=0)  # columns sum to b after a beta step


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_low_precision_against_float64(dtype):
    cost, a, b = _problem(4, 37, 26, dtype)
    plan, al, be = _kernel()(cost, a, b, 0.1, 20)
    assert plan.dtype == dtype and al.dtype == torch.float32 and be.dtype == torch.float32
    want = _torch_fwd(cost.to(F64), a.to(F64), b.to(F64), 0.1, 20)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(plan.to(F64), want[0], atol=tol * float(want[0].max()), rtol=tol)
    torch.testing.assert_close(al.to(F64), want[1], atol=tol * 100, rtol=tol)


@needs_kernel
def test_kernel_nonfinite_propagates():
    cost, a, b = _problem(2, 9, 8, F64)
    cost[1, 3, 4] = float("nan")
    plan = _kernel()(cost, a, b, 0.1, 5)[0]
    assert torch.isfinite(plan[0]).all()
    assert torch.isnan(plan[1]).any()


@needs_kernel
def test_kernel_thread_count_does_not_change_results():
    cost, a, b = _problem(9, 45, 38, torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel()(cost, a, b, 0.1, 10)
        torch.set_num_threads(2)
        two = _kernel()(cost, a, b, 0.1, 10)
    finally:
        torch.set_num_threads(old)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


@needs_kernel
def test_kernel_argument_errors():
    cost, a, b = _problem(2, 4, 5, F64)
    with pytest.raises(RuntimeError, match="sinkhorn_fwd_cpu: a must be"):
        _kernel()(cost, a[:, :3], b, 0.1, 3)
    with pytest.raises(RuntimeError, match="sinkhorn_fwd_cpu: n_iters"):
        _kernel()(cost, a, b, 0.1, 0)


@needs_kernel
@pytest.mark.parametrize("batched", [True, False])
def test_public_sinkhorn_routes_agree(monkeypatch, batched):
    """sinkhorn(backend="torch") on CPU: kernel route == forced PyTorch route, values and gradients
    (w.r.t. cost, a and b), and both match the float64 reference."""
    cost, a, b = _problem(3, 14, 11, F64, zero=False)
    if not batched:
        cost, a, b = cost[0], a[0], b[0]
    calls = []
    real = ops._cpu_sinkhorn_kernel

    def spy():
        fn = real()
        return None if fn is None else (lambda *args: calls.append(1) or fn(*args))

    monkeypatch.setattr(ops, "_cpu_sinkhorn_kernel", spy)
    results = {}
    for use in (True, False):
        calls.clear()
        monkeypatch.setattr(ops, "USE_CPU_KERNEL", use)
        c, aa, bb = (t.clone().requires_grad_() for t in (cost, a, b))
        plan = sinkhorn(c, epsilon=0.07, n_iters=8, a=aa, b=bb, backend="torch")
        (plan * torch.linspace(0, 1, plan.numel(), dtype=F64).view_as(plan)).sum().backward()
        results[use] = (plan.detach(), c.grad, aa.grad, bb.grad)
        assert len(calls) == (1 if use else 0)
    for x, y in zip(results[True], results[False]):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)
    want = reference.sinkhorn(cost, epsilon=0.07, n_iters=8, a=a, b=b)
    torch.testing.assert_close(results[True][0], want, atol=1e-12, rtol=1e-10)


def test_forced_torch_route_never_calls_the_extension(monkeypatch):
    """A pure-Python install (no _C): the route falls back to the PyTorch code."""
    monkeypatch.setattr(_backend, "load_extension", lambda: None)
    assert ops._cpu_sinkhorn_kernel() is None
    cost, a, b = _problem(2, 6, 5, F64)
    plan = sinkhorn(cost, epsilon=0.1, n_iters=6, a=a, b=b, backend="torch")
    torch.testing.assert_close(plan, reference.sinkhorn(cost, epsilon=0.1, n_iters=6, a=a, b=b), atol=1e-12, rtol=1e-10)
    monkeypatch.setattr(ops, "USE_CPU_KERNEL", False)
    assert ops._cpu_sinkhorn_kernel() is None


# ---- sinkhorn_loss (SinKD): the size-routed torch path against the literal reference ----------


@pytest.mark.parametrize("nb, c", [(2, 3), (33, 100), (64, 100), (128, 100), (300, 7)])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_sinkhorn_loss_against_reference_float64(nb, c, teacher_grad):
    g = torch.Generator().manual_seed(nb * 1000 + c)
    s = torch.randn(nb, c, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(nb, c, generator=g, dtype=F64, requires_grad=teacher_grad)
    out = sinkhorn_loss(s, t, backend="torch")
    grads = torch.autograd.grad(out, [s, t] if teacher_grad else [s])
    s2, t2 = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_(teacher_grad)
    ref = reference.sinkhorn_loss(s2, t2)
    ref_grads = torch.autograd.grad(ref, [s2, t2] if teacher_grad else [s2])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for x, y in zip(grads, ref_grads):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-8)


def test_public_api_has_sinkhorn():
    assert kd_kernels.sinkhorn is sinkhorn
