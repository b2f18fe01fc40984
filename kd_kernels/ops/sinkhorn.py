"""Custom ops of the optimal-transport family: schema, fake (meta) impl, backend dispatch
and autograd for

* ``kd_kernels::sinkhorn_loss_fwd`` / ``kd_kernels::sinkhorn_loss_bwd`` (SinKD), and
* ``kd_kernels::sinkhorn_fwd`` / ``kd_kernels::sinkhorn_bwd`` (batched log-domain Sinkhorn).

Every op takes the already-resolved backend name as its last argument. Inputs are validated
by the public functions in ``kd_kernels/losses/sinkhorn.py``, never here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd_kernels.torch_impl import sinkhorn as _torch_impl
from kd_kernels.torch_impl.sinkhorn import _compute_dtype  # the fakes must agree with the kernels' dtype rule

# backend -> (forward, backward). "triton" and "cuda" kernels register here when written.
_SINKHORN_LOSS_IMPLS = {"torch": (_torch_impl.sinkhorn_loss_fwd, _torch_impl.sinkhorn_loss_bwd)}
_SINKHORN_IMPLS = {"torch": (_torch_impl.sinkhorn_fwd, _torch_impl.sinkhorn_bwd)}


def _impl(table: dict, op: str, backend: str):
    if backend not in table:
        raise NotImplementedError(f"kd_kernels::{op}: no {backend!r} kernel; available: {tuple(table)}")
    return table[backend]


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


# --------------------------------------------------------------------------- SinKD


@torch.library.custom_op("kd_kernels::sinkhorn_loss_fwd", mutates_args=())
def sinkhorn_loss_fwd(
    student: Tensor,
    teacher: Tensor,
    temperature: float,
    epsilon: float,
    n_iters: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SinKD forward: (loss [], cost D [B, B], row scales U [L+1, B], column scales V [L+1, B])."""
    fwd, _ = _impl(_SINKHORN_LOSS_IMPLS, "sinkhorn_loss_fwd", backend)
    return fwd(student, teacher, temperature, epsilon, n_iters)


@sinkhorn_loss_fwd.register_fake
def _(student, teacher, temperature, epsilon, n_iters, backend):
    nb = student.shape[0]
    dt = _compute_dtype(student, teacher)
    return (
        student.new_empty(()),
        student.new_empty((nb, nb), dtype=dt),
        student.new_empty((n_iters + 1, nb), dtype=dt),
        student.new_empty((n_iters + 1, nb), dtype=dt),
    )


@torch.library.custom_op("kd_kernels::sinkhorn_loss_bwd", mutates_args=())
def sinkhorn_loss_bwd(
    grad: Tensor,
    student: Tensor,
    teacher: Tensor,
    cost: Tensor,
    u: Tensor,
    v: Tensor,
    temperature: float,
    epsilon: float,
    need_student: bool,
    need_teacher: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """SinKD backward: (grad_student, grad_teacher); an empty tensor for a grad not needed."""
    _, bwd = _impl(_SINKHORN_LOSS_IMPLS, "sinkhorn_loss_bwd", backend)
    gs, gt = bwd(
        grad,
        student,
        teacher,
        cost,
        u,
        v,
        temperature,
        epsilon,
        need_student,
        need_teacher,
    )
    return _empty_if_none(gs, student), _empty_if_none(gt, teacher)


@sinkhorn_loss_bwd.register_fake
def _(
    grad,
    student,
    teacher,
    cost,
    u,
    v,
    temperature,
    epsilon,
    need_student,
    need_teacher,
    backend,
):
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if need_student else student.new_empty(0)
    gt = torch.empty_like(teacher, memory_format=torch.contiguous_format) if need_teacher else teacher.new_empty(0)
    return gs, gt


def _sinkhorn_loss_setup(ctx, inputs, output):
    student, teacher, temperature, epsilon, _, backend = inputs
    _, cost, u, v = output
    ctx.mark_non_differentiable(cost, u, v)
    ctx.save_for_backward(student, teacher, cost, u, v)
    ctx.args = (temperature, epsilon, backend)


def _sinkhorn_loss_backward(ctx, grad, *_unused):
    student, teacher, cost, u, v = ctx.saved_tensors
    temperature, epsilon, backend = ctx.args
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gs, gt = sinkhorn_loss_bwd(
        grad,
        student,
        teacher,
        cost,
        u,
        v,
        temperature,
        epsilon,
        need_s,
        need_t,
        backend,
    )
    return (gs if need_s else None), (gt if need_t else None), None, None, None, None


sinkhorn_loss_fwd.register_autograd(_sinkhorn_loss_backward, setup_context=_sinkhorn_loss_setup)


# --------------------------------------------------------------------------- batched Sinkhorn


@torch.library.custom_op("kd_kernels::sinkhorn_fwd", mutates_args=())
def sinkhorn_fwd(
    cost: Tensor, a: Tensor, b: Tensor, epsilon: float, n_iters: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-domain Sinkhorn on cost [B, n, m], marginals a [B, n], b [B, m]:
    (plan [B, n, m] in cost's dtype, alphas [L, B, n], betas [L, B, m] scaled dual potentials)."""
    fwd, _ = _impl(_SINKHORN_IMPLS, "sinkhorn_fwd", backend)
    return fwd(cost, a, b, epsilon, n_iters)


@sinkhorn_fwd.register_fake
def _(cost, a, b, epsilon, n_iters, backend):
    nb, n, m = cost.shape
    dt = _compute_dtype(cost, a, b)
    return (
        cost.new_empty((nb, n, m)),
        cost.new_empty((n_iters, nb, n), dtype=dt),
        cost.new_empty((n_iters, nb, m), dtype=dt),
    )


@torch.library.custom_op("kd_kernels::sinkhorn_bwd", mutates_args=())
def sinkhorn_bwd(
    grad: Tensor,
    cost: Tensor,
    a: Tensor,
    b: Tensor,
    alphas: Tensor,
    betas: Tensor,
    epsilon: float,
    need_cost: bool,
    need_a: bool,
    need_b: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`sinkhorn_fwd`: (grad_cost, grad_a, grad_b); empty tensors where not needed."""
    _, bwd = _impl(_SINKHORN_IMPLS, "sinkhorn_bwd", backend)
    gc, ga, gb = bwd(grad, cost, a, b, alphas, betas, epsilon, need_cost, need_a, need_b)
    return _empty_if_none(gc, cost), _empty_if_none(ga, a), _empty_if_none(gb, b)


@sinkhorn_bwd.register_fake
def _(grad, cost, a, b, alphas, betas, epsilon, need_cost, need_a, need_b, backend):
    def like(t, need):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if need else t.new_empty(0)

    return like(cost, need_cost), like(a, need_a), like(b, need_b)


def _sinkhorn_setup(ctx, inputs, output):
    cost, a, b, epsilon, _, backend = inputs
    _, alphas, betas = output
    ctx.mark_non_differentiable(alphas, betas)
    ctx.save_for_backward(cost, a, b, alphas, betas)
    ctx.args = (epsilon, backend)


def _sinkhorn_backward(ctx, grad, *_unused):
    cost, a, b, alphas, betas = ctx.saved_tensors
    epsilon, backend = ctx.args
    need = ctx.needs_input_grad[:3]
    gc, ga, gb = sinkhorn_bwd(grad, cost, a, b, alphas, betas, epsilon, *need, backend)
    return (*(g if n else None for g, n in zip((gc, ga, gb), need, strict=True)), None, None, None)


sinkhorn_fwd.register_autograd(_sinkhorn_backward, setup_context=_sinkhorn_setup)
