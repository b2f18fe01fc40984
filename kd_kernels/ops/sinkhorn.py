"""Custom ops of the optimal-transport family (math: docs/sinkhorn.md), defined with
:func:`kd_kernels.ops._define.define_loss_op` (autograd, dispatch on the resolved ``backend``,
float64 routing, the double-backward error):

* ``kd_kernels::sinkhorn_loss_fwd(student, teacher, temperature, epsilon, n_iters, backend)``
  -> ``(loss [], cost D [B, B], row scales U [L+1, B], column scales V [L+1, B])`` and
  ``kd_kernels::sinkhorn_loss_bwd(grad, student, teacher, cost, u, v, temperature, epsilon,
  need_student, need_teacher, backend)`` -> ``(grad_student, grad_teacher)`` (SinKD);
* ``kd_kernels::sinkhorn_fwd(cost [B, n, m], a [B, n], b [B, m], epsilon, n_iters, tol,
  check_every, implicit, backend)`` -> ``(plan [B, n, m] in cost's dtype, alphas [S, B, n],
  betas [S, B, m], n_run [B] int32)`` (scaled dual potentials, S = n_iters, or 1 when
  ``implicit``; ``n_run``: iterations each problem ran, < n_iters when ``tol`` > 0 froze it) and
  ``kd_kernels::sinkhorn_bwd(grad, cost, a, b, alphas, betas, n_run, epsilon, n_iters, implicit,
  need_cost, need_a, need_b, backend)`` -> ``(grad_cost, grad_a, grad_b)`` (batched log-domain
  Sinkhorn; contract in the "Batched log-domain Sinkhorn" block of kd_kernels/torch_impl/sinkhorn.py).

An unneeded gradient is an empty tensor. Inputs are validated by the public functions in
``kd_kernels/losses/sinkhorn.py``, never here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kd_kernels import _backend
from kd_kernels.ops._define import cuda_function, define_loss_op, lazy
from kd_kernels.torch_impl import sinkhorn as _torch_impl
from kd_kernels.torch_impl.sinkhorn import _compute_dtype  # the fakes must agree with the kernels' dtype rule

# The "torch" backend's forward of ``sinkhorn`` on CPU tensors runs the fused C++ kernel
# ``kd_kernels._C.sinkhorn_fwd_cpu`` (csrc/cpu/sinkhorn.cpp: one problem per thread, its cost in
# cache for all iterations, one exp per element and iteration) when the extension is built, else
# the PyTorch code of torch_impl. Both return the same (plan, alphas, betas), so the backward is
# always torch_impl.sinkhorn_bwd. Set to False to force the PyTorch code (tests, comparisons).
USE_CPU_KERNEL = True


def _cpu_sinkhorn_kernel() -> Callable | None:
    """``kd_kernels._C.sinkhorn_fwd_cpu`` when the extension is loaded and has it, else None."""
    if not USE_CPU_KERNEL:
        return None
    ext = _backend.load_extension()
    return getattr(ext, "sinkhorn_fwd_cpu", None) if ext is not None else None


def _sinkhorn_fwd_torch(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: float,
    n_iters: int,
    tol: float,
    check_every: int,
    implicit: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "torch" backend's forward: the C++ CPU kernel for CPU tensors when built (fixed
    iteration count, unrolled saves), else torch_impl (which also does ``tol`` and ``implicit``)."""
    if cost.device.type == "cpu" and tol <= 0 and not implicit:
        kernel = _cpu_sinkhorn_kernel()
        if kernel is not None:
            plan, alphas, betas = kernel(cost, a, b, float(epsilon), int(n_iters))
            return plan, alphas, betas, torch.full((cost.shape[0],), n_iters, dtype=torch.int32)
    return _torch_impl.sinkhorn_fwd(cost, a, b, epsilon, n_iters, tol, check_every, implicit)


# backend -> (forward, backward). "triton" and "cuda" kernels register here when written.
_SINKHORN_LOSS_IMPLS = {
    "torch": (_torch_impl.sinkhorn_loss_fwd, _torch_impl.sinkhorn_loss_bwd),
    "triton": (
        lazy("kd_kernels.triton.sinkhorn_loss", "sinkhorn_loss_fwd_triton"),
        lazy("kd_kernels.triton.sinkhorn_loss", "sinkhorn_loss_bwd_triton"),
    ),
}
# CUDA C++ (csrc/cuda/sinkhorn.cu): the op's arguments in order; unneeded gradients come back empty.
_SINKHORN_LOSS_IMPLS["cuda"] = (cuda_function("sinkhorn_loss_fwd_cuda"), cuda_function("sinkhorn_loss_bwd_cuda"))
_SINKHORN_IMPLS = {"torch": (_sinkhorn_fwd_torch, _torch_impl.sinkhorn_bwd)}
_SINKHORN_IMPLS["cuda"] = (cuda_function("sinkhorn_fwd_cuda"), cuda_function("sinkhorn_bwd_cuda"))
_SINKHORN_IMPLS["triton"] = (  # kd_kernels/triton/sinkhorn.py: the same contract (tol, check_every, implicit)
    lazy("kd_kernels.triton.sinkhorn", "sinkhorn_fwd_triton"),
    lazy("kd_kernels.triton.sinkhorn", "sinkhorn_bwd_triton"),
)


def _sinkhorn_loss_fake(student, teacher, temperature, epsilon, n_iters):
    nb = student.shape[0]
    dt = _compute_dtype(student, teacher)
    return (
        student.new_empty(()),
        student.new_empty((nb, nb), dtype=dt),
        student.new_empty((n_iters + 1, nb), dtype=dt),
        student.new_empty((n_iters + 1, nb), dtype=dt),
    )


def _sinkhorn_fake(cost, a, b, epsilon, n_iters, tol, check_every, implicit):
    nb, n, m = cost.shape
    dt = _compute_dtype(cost, a, b)
    saved = 1 if implicit else n_iters
    return (
        cost.new_empty((nb, n, m)),
        cost.new_empty((saved, nb, n), dtype=dt),
        cost.new_empty((saved, nb, m), dtype=dt),
        cost.new_empty((nb,), dtype=torch.int32),
    )


sinkhorn_loss_fwd, sinkhorn_loss_bwd = define_loss_op(
    "sinkhorn_loss",
    fwd_schema=(
        "(Tensor student, Tensor teacher, float temperature, float epsilon, SymInt n_iters, str backend) "
        "-> (Tensor loss, Tensor cost, Tensor u, Tensor v)"
    ),
    bwd_schema=(
        "(Tensor grad, Tensor student, Tensor teacher, Tensor cost, Tensor u, Tensor v, float temperature, "
        "float epsilon, bool need_student, bool need_teacher, str backend) "
        "-> (Tensor grad_student, Tensor grad_teacher)"
    ),
    fake_fwd=_sinkhorn_loss_fake,
    kernels=_SINKHORN_LOSS_IMPLS,
)

sinkhorn_fwd, sinkhorn_bwd = define_loss_op(
    "sinkhorn",
    fwd_schema=(
        "(Tensor cost, Tensor a, Tensor b, float epsilon, SymInt n_iters, float tol, SymInt check_every, "
        "bool implicit, str backend) -> (Tensor plan, Tensor alphas, Tensor betas, Tensor n_run)"
    ),
    bwd_schema=(
        "(Tensor grad, Tensor cost, Tensor a, Tensor b, Tensor alphas, Tensor betas, Tensor n_run, float epsilon, "
        "SymInt n_iters, bool implicit, bool need_cost, bool need_a, bool need_b, str backend) "
        "-> (Tensor grad_cost, Tensor grad_a, Tensor grad_b)"
    ),
    fake_fwd=_sinkhorn_fake,
    kernels=_SINKHORN_IMPLS,
)
