"""Custom ops of the feature-geometry losses: ``kd_kernels::{gram,cka,relation,procrustes}_{fwd,bwd}``.

Each ``*_fwd`` returns the loss (0-dim, student dtype) followed by the small statistics its
backward needs (see kd_kernels/torch_impl/geometry.py for the layout: column means, scales,
the D x D or N x N Gram products or the Procrustes polar factor, per-item HSIC terms). Each
``*_bwd`` returns (grad_student, grad_teacher), an empty tensor for a gradient not asked for.
The last argument ``backend`` is already resolved ("torch", "triton" or "cuda"); the
``_IMPLS`` table below is where Triton / CUDA kernels plug in. Validation happens once, in
kd_kernels/losses/geometry.py, never here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd_kernels.torch_impl import geometry as _torch

# (loss, "fwd" | "bwd") -> {backend: implementation}. Other backends are added here.
_IMPLS = {
    ("gram", "fwd"): {"torch": _torch.gram_forward},
    ("gram", "bwd"): {"torch": _torch.gram_backward},
    ("cka", "fwd"): {"torch": _torch.cka_forward},
    ("cka", "bwd"): {"torch": _torch.cka_backward},
    ("relation", "fwd"): {"torch": _torch.relation_forward},
    ("relation", "bwd"): {"torch": _torch.relation_backward},
    ("procrustes", "fwd"): {"torch": _torch.procrustes_forward},
    ("procrustes", "bwd"): {"torch": _torch.procrustes_backward},
}


def _impl(loss: str, which: str, backend: str):
    table = _IMPLS[(loss, which)]
    if backend not in table:
        raise NotImplementedError(f"kd_kernels::{loss}_{which}: no {backend!r} kernel (available: {tuple(table)})")
    return table[backend]


# --------------------------------------------------------------------------- fakes (shapes only)


def _dims(student: Tensor, teacher: Tensor):
    b = student.shape[0] if student.dim() == 3 else 1
    return b, student.shape[-2], student.shape[-1], teacher.shape[-1]


def _fake_prep(x: Tensor, dt: torch.dtype, b: int, n: int, d: int, center: bool, norm: str):
    mu = x.new_empty((b, d) if center else (0,), dtype=dt)
    scale_shape = {_torch.FROB: (b,), _torch.ROW: (b, n), _torch.NONE: (0,)}[norm]
    return mu, x.new_empty(scale_shape, dtype=dt)


def _fake_geometry(student: Tensor, teacher: Tensor, center: bool, norm: str):
    dt = _torch.compute_dtype(student, teacher)
    b, n, ds, dtt = _dims(student, teacher)
    mu_x, s_x = _fake_prep(student, dt, b, n, ds, center, norm)
    mu_y, s_y = _fake_prep(student, dt, b, n, dtt, center, norm)
    if _torch.choose_form(n, ds, dtt) == _torch.DD:
        mats = [(b, ds, ds), (b, ds, dtt), (b, dtt, dtt)]
    else:
        mats = [(b, n, n), (0,), (b, n, n)]
    m_xx, m_xy, m_yy = (student.new_empty(s, dtype=dt) for s in mats)
    h = student.new_empty((b, 3), dtype=dt)
    return student.new_empty(()), mu_x, s_x, mu_y, s_y, m_xx, m_xy, m_yy, h


def _fake_grads(student: Tensor, teacher: Tensor, need_student: bool, need_teacher: bool):
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if need_student else student.new_empty(0)
    gt = torch.empty_like(teacher, memory_format=torch.contiguous_format) if need_teacher else teacher.new_empty(0)
    return gs, gt


# --------------------------------------------------------------------------- autograd plumbing


def _setup_context(ctx, inputs, output):
    student, teacher, mask = inputs[:3]
    ctx.flags = inputs[3:-1]
    ctx.backend = inputs[-1]
    ctx.save_for_backward(student, teacher, mask, *output[1:])


def _make_backward(bwd_op):
    def backward(ctx, grad, *_unused):
        student, teacher, mask, *saved = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gs, gt = bwd_op(grad, student, teacher, mask, *saved, *ctx.flags, need_s, need_t, ctx.backend)
        return (gs if need_s else None, gt if need_t else None, None) + (None,) * (len(ctx.flags) + 1)

    return backward


# --------------------------------------------------------------------------- gram

_G8 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("kd_kernels::gram_fwd", mutates_args=())
def gram_fwd(student: Tensor, teacher: Tensor, mask: Tensor | None, center: bool, normalize: bool, backend: str) -> _G8:
    loss, saved = _impl("gram", "fwd", backend)(student, teacher, mask, center, normalize)
    return (loss, *saved)


@gram_fwd.register_fake
def _(student, teacher, mask, center, normalize, backend):
    return _fake_geometry(student, teacher, center, _torch.FROB if normalize else _torch.NONE)


@torch.library.custom_op("kd_kernels::gram_bwd", mutates_args=())
def gram_bwd(
    grad: Tensor,
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    mu_x: Tensor,
    scale_x: Tensor,
    mu_y: Tensor,
    scale_y: Tensor,
    m_xx: Tensor,
    m_xy: Tensor,
    m_yy: Tensor,
    h: Tensor,
    center: bool,
    normalize: bool,
    need_student: bool,
    need_teacher: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    saved = (mu_x, scale_x, mu_y, scale_y, m_xx, m_xy, m_yy, h)
    return _impl("gram", "bwd", backend)(
        grad, student, teacher, mask, saved, center, normalize, need_student, need_teacher
    )


@gram_bwd.register_fake
def _(
    grad,
    student,
    teacher,
    mask,
    mu_x,
    scale_x,
    mu_y,
    scale_y,
    m_xx,
    m_xy,
    m_yy,
    h,
    center,
    normalize,
    need_student,
    need_teacher,
    backend,
):
    return _fake_grads(student, teacher, need_student, need_teacher)


gram_fwd.register_autograd(_make_backward(gram_bwd), setup_context=_setup_context)


# --------------------------------------------------------------------------- cka


@torch.library.custom_op("kd_kernels::cka_fwd", mutates_args=())
def cka_fwd(student: Tensor, teacher: Tensor, mask: Tensor | None, unbiased: bool, backend: str) -> _G8:
    loss, saved = _impl("cka", "fwd", backend)(student, teacher, mask, unbiased)
    return (loss, *saved)


@cka_fwd.register_fake
def _(student, teacher, mask, unbiased, backend):
    return _fake_geometry(student, teacher, True, _torch.FROB)


@torch.library.custom_op("kd_kernels::cka_bwd", mutates_args=())
def cka_bwd(
    grad: Tensor,
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    mu_x: Tensor,
    scale_x: Tensor,
    mu_y: Tensor,
    scale_y: Tensor,
    m_xx: Tensor,
    m_xy: Tensor,
    m_yy: Tensor,
    h: Tensor,
    unbiased: bool,
    need_student: bool,
    need_teacher: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    saved = (mu_x, scale_x, mu_y, scale_y, m_xx, m_xy, m_yy, h)
    return _impl("cka", "bwd", backend)(grad, student, teacher, mask, saved, unbiased, need_student, need_teacher)


@cka_bwd.register_fake
def _(
    grad,
    student,
    teacher,
    mask,
    mu_x,
    scale_x,
    mu_y,
    scale_y,
    m_xx,
    m_xy,
    m_yy,
    h,
    unbiased,
    need_student,
    need_teacher,
    backend,
):
    return _fake_grads(student, teacher, need_student, need_teacher)


cka_fwd.register_autograd(_make_backward(cka_bwd), setup_context=_setup_context)


# --------------------------------------------------------------------------- relation


@torch.library.custom_op("kd_kernels::relation_fwd", mutates_args=())
def relation_fwd(student: Tensor, teacher: Tensor, mask: Tensor | None, backend: str) -> _G8:
    loss, saved = _impl("relation", "fwd", backend)(student, teacher, mask)
    return (loss, *saved)


@relation_fwd.register_fake
def _(student, teacher, mask, backend):
    return _fake_geometry(student, teacher, False, _torch.ROW)


@torch.library.custom_op("kd_kernels::relation_bwd", mutates_args=())
def relation_bwd(
    grad: Tensor,
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    mu_x: Tensor,
    scale_x: Tensor,
    mu_y: Tensor,
    scale_y: Tensor,
    m_xx: Tensor,
    m_xy: Tensor,
    m_yy: Tensor,
    h: Tensor,
    need_student: bool,
    need_teacher: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    saved = (mu_x, scale_x, mu_y, scale_y, m_xx, m_xy, m_yy, h)
    return _impl("relation", "bwd", backend)(grad, student, teacher, mask, saved, need_student, need_teacher)


@relation_bwd.register_fake
def _(
    grad, student, teacher, mask, mu_x, scale_x, mu_y, scale_y, m_xx, m_xy, m_yy, h, need_student, need_teacher, backend
):
    return _fake_grads(student, teacher, need_student, need_teacher)


relation_fwd.register_autograd(_make_backward(relation_bwd), setup_context=_setup_context)


# --------------------------------------------------------------------------- procrustes


@torch.library.custom_op("kd_kernels::procrustes_fwd", mutates_args=())
def procrustes_fwd(
    student: Tensor, teacher: Tensor, mask: Tensor | None, center: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, saved = _impl("procrustes", "fwd", backend)(student, teacher, mask, center)
    return (loss, *saved)


@procrustes_fwd.register_fake
def _(student, teacher, mask, center, backend):
    dt = _torch.compute_dtype(student, teacher)
    b, n, ds, dtt = _dims(student, teacher)
    mu_x, s_x = _fake_prep(student, dt, b, n, ds, center, _torch.FROB)
    mu_y, s_y = _fake_prep(student, dt, b, n, dtt, center, _torch.FROB)
    return student.new_empty(()), mu_x, s_x, mu_y, s_y, student.new_empty((b, ds, dtt), dtype=dt)


@torch.library.custom_op("kd_kernels::procrustes_bwd", mutates_args=())
def procrustes_bwd(
    grad: Tensor,
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    mu_x: Tensor,
    scale_x: Tensor,
    mu_y: Tensor,
    scale_y: Tensor,
    polar: Tensor,
    center: bool,
    need_student: bool,
    need_teacher: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    saved = (mu_x, scale_x, mu_y, scale_y, polar)
    return _impl("procrustes", "bwd", backend)(grad, student, teacher, mask, saved, center, need_student, need_teacher)


@procrustes_bwd.register_fake
def _(grad, student, teacher, mask, mu_x, scale_x, mu_y, scale_y, polar, center, need_student, need_teacher, backend):
    return _fake_grads(student, teacher, need_student, need_teacher)


procrustes_fwd.register_autograd(_make_backward(procrustes_bwd), setup_context=_setup_context)
