"""Custom ops of the RKD family: ``kd_kernels::rkd_distance_fwd`` / ``_bwd`` and
``kd_kernels::rkd_angle_fwd`` / ``_bwd``, with fake (meta) implementations and autograd.

Each op takes the already resolved backend name as its last argument and dispatches on it
through ``_DISTANCE`` / ``_ANGLE`` (backend -> (forward, backward)). Adding a kernel is one
line in each dict, e.g. ``"triton": (rkd_distance_fwd_triton, rkd_distance_bwd_triton)``;
the kernels take the same arguments as the torch_impl functions. Inputs are validated once
in ``kd_kernels/losses/rkd.py``, never here.
"""

from __future__ import annotations

import importlib

import torch

from kd_kernels._backend import load_extension
from kd_kernels.ops import rkd_cuda_defs as _rkd_cuda_defs  # noqa: F401  (defines the rkd_*_cuda schemas)
from kd_kernels.torch_impl import rkd as _torch_impl

__all__ = ["rkd_angle_bwd", "rkd_angle_fwd", "rkd_distance_bwd", "rkd_distance_fwd"]


def _triton(name: str):
    """A launcher of kd_kernels/triton/rkd.py, imported on first call (Triton loads lazily)."""

    def call(*args):
        return getattr(importlib.import_module("kd_kernels.triton.rkd"), name)(*args)

    return call


def _cuda(name: str):
    """An op of csrc/cuda/rkd.cu (``kd_kernels._C`` loads on first call)."""

    def call(*args):
        load_extension()
        return getattr(torch.ops.kd_kernels, name)(*args)

    return call


_DISTANCE = {
    "torch": (_torch_impl.rkd_distance_fwd, _torch_impl.rkd_distance_bwd),
    "triton": (_triton("rkd_distance_fwd_triton"), _triton("rkd_distance_bwd_triton")),
    "cuda": (_cuda("rkd_distance_fwd_cuda"), _cuda("rkd_distance_bwd_cuda")),
}
_ANGLE = {
    "torch": (_torch_impl.rkd_angle_fwd, _torch_impl.rkd_angle_bwd),
    "triton": (_triton("rkd_angle_fwd_triton"), _triton("rkd_angle_bwd_triton")),
    "cuda": (_cuda("rkd_angle_fwd_cuda"), _cuda("rkd_angle_bwd_cuda")),
}


def _kernels(table: dict, backend: str, op: str):
    if backend not in table:
        raise NotImplementedError(f"kd_kernels::{op}: no {backend!r} kernel (available: {tuple(table)})")
    return table[backend]


def _grad_or_empty(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """custom ops cannot return None: an unneeded gradient travels as an empty tensor."""
    return like.new_empty(0) if grad is None else grad


def _fake_grads(student, teacher, need_student, need_teacher):
    return (
        torch.empty_like(student, memory_format=torch.contiguous_format) if need_student else student.new_empty(0),
        torch.empty_like(teacher, memory_format=torch.contiguous_format) if need_teacher else teacher.new_empty(0),
    )


# ---------------------------------------------------------------------------------- distance


@torch.library.custom_op("kd_kernels::rkd_distance_fwd", mutates_args=())
def rkd_distance_fwd(
    student: torch.Tensor, teacher: torch.Tensor, reduction: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mu_s, mu_t): loss 0-dim or [N, N] ("none"); mu_* 0-dim, saved for the backward."""
    return _kernels(_DISTANCE, backend, "rkd_distance_fwd")[0](student, teacher, reduction)


@rkd_distance_fwd.register_fake
def _(student, teacher, reduction, backend):
    n = student.shape[0]
    dtype = _torch_impl.compute_dtype(student, teacher)
    loss = student.new_empty((n, n) if reduction == "none" else ())
    return loss, student.new_empty((), dtype=dtype), student.new_empty((), dtype=dtype)


@torch.library.custom_op("kd_kernels::rkd_distance_bwd", mutates_args=())
def rkd_distance_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    mu_s: torch.Tensor,
    mu_t: torch.Tensor,
    reduction: str,
    need_student: bool,
    need_teacher: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_student, grad_teacher); an unneeded one is an empty tensor."""
    bwd = _kernels(_DISTANCE, backend, "rkd_distance_bwd")[1]
    gs, gt = bwd(grad, student, teacher, mu_s, mu_t, reduction, need_student, need_teacher)
    return _grad_or_empty(gs, student), _grad_or_empty(gt, teacher)


@rkd_distance_bwd.register_fake
def _(grad, student, teacher, mu_s, mu_t, reduction, need_student, need_teacher, backend):
    return _fake_grads(student, teacher, need_student, need_teacher)


def _distance_setup(ctx, inputs, output):
    student, teacher, reduction, backend = inputs
    _, mu_s, mu_t = output
    ctx.save_for_backward(student, teacher, mu_s, mu_t)
    ctx.reduction, ctx.backend = reduction, backend


def _distance_backward(ctx, grad, _grad_mu_s, _grad_mu_t):
    student, teacher, mu_s, mu_t = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gs, gt = rkd_distance_bwd(grad, student, teacher, mu_s, mu_t, ctx.reduction, need_s, need_t, ctx.backend)
    return (gs if need_s else None), (gt if need_t else None), None, None


rkd_distance_fwd.register_autograd(_distance_backward, setup_context=_distance_setup)


# ------------------------------------------------------------------------------------- angle


@torch.library.custom_op("kd_kernels::rkd_angle_fwd", mutates_args=())
def rkd_angle_fwd(student: torch.Tensor, teacher: torch.Tensor, reduction: str, backend: str) -> torch.Tensor:
    """Loss: 0-dim or [N] ("none", per-anchor means)."""
    return _kernels(_ANGLE, backend, "rkd_angle_fwd")[0](student, teacher, reduction)


@rkd_angle_fwd.register_fake
def _(student, teacher, reduction, backend):
    return student.new_empty((student.shape[0],) if reduction == "none" else ())


@torch.library.custom_op("kd_kernels::rkd_angle_bwd", mutates_args=())
def rkd_angle_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    reduction: str,
    need_student: bool,
    need_teacher: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_student, grad_teacher); an unneeded one is an empty tensor."""
    bwd = _kernels(_ANGLE, backend, "rkd_angle_bwd")[1]
    gs, gt = bwd(grad, student, teacher, reduction, need_student, need_teacher)
    return _grad_or_empty(gs, student), _grad_or_empty(gt, teacher)


@rkd_angle_bwd.register_fake
def _(grad, student, teacher, reduction, need_student, need_teacher, backend):
    return _fake_grads(student, teacher, need_student, need_teacher)


def _angle_setup(ctx, inputs, output):
    student, teacher, reduction, backend = inputs
    ctx.save_for_backward(student, teacher)
    ctx.reduction, ctx.backend = reduction, backend


def _angle_backward(ctx, grad):
    student, teacher = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gs, gt = rkd_angle_bwd(grad, student, teacher, ctx.reduction, need_s, need_t, ctx.backend)
    return (gs if need_s else None), (gt if need_t else None), None, None


rkd_angle_fwd.register_autograd(_angle_backward, setup_context=_angle_setup)
