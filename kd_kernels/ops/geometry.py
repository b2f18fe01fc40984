"""Custom ops of the feature-geometry losses (math: docs/geometry.md):
``kd_kernels::{gram,cka,relation,procrustes}_{fwd,bwd}``, defined with
:func:`kd_kernels.ops._define.define_loss_op` (autograd, dispatch on the resolved ``backend``,
float64 routing, the double-backward error).

Each ``*_fwd`` returns the loss (0-dim, student dtype) followed by the small statistics its
backward needs (see kd_kernels/torch_impl/geometry.py for the layout: column means, scales,
the D x D or N x N Gram products or the Procrustes polar factor, per-item HSIC terms). Each
``*_bwd`` returns (grad_student, grad_teacher), an empty tensor for a gradient not asked for.
The last argument ``backend`` is already resolved ("torch", "triton" or "cuda"); the
``_KERNELS`` table below is where Triton / CUDA kernels plug in. Validation happens once, in
kd_kernels/losses/geometry.py, never here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd_kernels.ops._define import define_loss_op, lazy
from kd_kernels.torch_impl import geometry as _torch


def _flat_forward(fn):
    """The torch_impl forward returns (loss, saved); the op returns (loss, *saved)."""

    def forward(*args):
        loss, saved = fn(*args)
        return (loss, *saved)

    return forward


def _grouped_backward(fn, n_saved: int):
    """The op passes the saved statistics one by one; the torch_impl backward takes a tuple."""

    def backward(grad, student, teacher, mask, *rest):
        return fn(grad, student, teacher, mask, tuple(rest[:n_saved]), *rest[n_saved:])

    return backward


def _torch_kernels(loss: str, n_saved: int) -> tuple:
    return (
        _flat_forward(getattr(_torch, f"{loss}_forward")),
        _grouped_backward(getattr(_torch, f"{loss}_backward"), n_saved),
    )


_TRITON = "kd_kernels.triton.geometry"


def _triton_kernels(loss: str) -> tuple:
    """kd_kernels/triton/geometry.py launchers (imported on first call; fp32/fp16/bf16 only)."""
    return (lazy(_TRITON, f"{loss}_fwd_triton"), lazy(_TRITON, f"{loss}_bwd_triton"))


_CUDA = "kd_kernels.ops.geometry_cuda"


def _cuda_kernels(loss: str) -> tuple:
    """kd_kernels/ops/geometry_cuda.py launchers on the CUDA C++ primitives of csrc/cuda/geometry.cu
    (kd_kernels._C; imported on first call; fp32/fp16/bf16 only)."""
    return (lazy(_CUDA, f"{loss}_fwd_cuda"), lazy(_CUDA, f"{loss}_bwd_cuda"))


# loss -> {backend: (forward, backward)}. Other backends are added here.
_KERNELS = {
    "gram": {"torch": _torch_kernels("gram", 8), "triton": _triton_kernels("gram"), "cuda": _cuda_kernels("gram")},
    "cka": {"torch": _torch_kernels("cka", 8), "triton": _triton_kernels("cka"), "cuda": _cuda_kernels("cka")},
    "relation": {
        "torch": _torch_kernels("relation", 8),
        "triton": _triton_kernels("relation"),
        "cuda": _cuda_kernels("relation"),
    },
    "procrustes": {
        "torch": _torch_kernels("procrustes", 5),
        "triton": (  # kd_kernels/triton/procrustes.py
            lazy("kd_kernels.triton.procrustes", "procrustes_fwd_triton"),
            lazy("kd_kernels.triton.procrustes", "procrustes_bwd_triton"),
        ),
        "cuda": _cuda_kernels("procrustes"),
    },
}




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




# --------------------------------------------------------------------------- the ops

_STATS = "Tensor mu_x, Tensor scale_x, Tensor mu_y, Tensor scale_y, Tensor m_xx, Tensor m_xy, Tensor m_yy, Tensor h"
_GRADS = "-> (Tensor grad_student, Tensor grad_teacher)"


def _define(loss: str, flags: str, stats: str, fake):
    """``kd_kernels::<loss>_fwd(student, teacher, mask, <flags>, backend) -> (loss, <stats>)`` and
    ``<loss>_bwd(grad, student, teacher, mask, <stats>, <flags>, need_student, need_teacher, backend)``."""
    return define_loss_op(
        loss,
        fwd_schema=f"(Tensor student, Tensor teacher, Tensor? mask, {flags}str backend) -> (Tensor loss, {stats})",
        bwd_schema=(
            f"(Tensor grad, Tensor student, Tensor teacher, Tensor? mask, {stats}, {flags}bool need_student, "
            f"bool need_teacher, str backend) {_GRADS}"
        ),
        fake_fwd=fake,
        kernels=_KERNELS[loss],
    )


def _procrustes_fake(student, teacher, mask, center):
    dt = _torch.compute_dtype(student, teacher)
    b, n, ds, dtt = _dims(student, teacher)
    mu_x, s_x = _fake_prep(student, dt, b, n, ds, center, _torch.FROB)
    mu_y, s_y = _fake_prep(student, dt, b, n, dtt, center, _torch.FROB)
    return student.new_empty(()), mu_x, s_x, mu_y, s_y, student.new_empty((b, ds, dtt), dtype=dt)


gram_fwd, gram_bwd = _define(
    "gram",
    "bool center, bool normalize, ",
    _STATS,
    lambda s, t, mask, center, normalize: _fake_geometry(s, t, center, _torch.FROB if normalize else _torch.NONE),
)
cka_fwd, cka_bwd = _define(
    "cka", "bool unbiased, ", _STATS, lambda s, t, mask, unbiased: _fake_geometry(s, t, True, _torch.FROB)
)
relation_fwd, relation_bwd = _define(
    "relation", "", _STATS, lambda s, t, mask: _fake_geometry(s, t, False, _torch.ROW)
)
procrustes_fwd, procrustes_bwd = _define(
    "procrustes",
    "bool center, ",
    "Tensor mu_x, Tensor scale_x, Tensor mu_y, Tensor scale_y, Tensor polar",
    _procrustes_fake,
)
