"""Schemas and fake (meta) implementations of the CUDA C++ RKD ops (``csrc/cuda/rkd.cu``).

The compiled library ``kd_kernels._C`` registers CUDA kernels for these ops
(``TORCH_LIBRARY_IMPL(kd_kernels, CUDA, m)``); the schemas are defined here, in Python, so that
the ops exist, and fake tensors and ``torch.compile`` trace through them, whether or not the
extension was built and whether or not a GPU is present. This module imports neither
``kd_kernels._C`` nor Triton and touches no GPU.

The semantics are those of the PyTorch path ``kd_kernels.torch_impl.rkd`` (same arguments):
lenscloth/RKD's ``RkdDistance`` and ``RKdAngle`` (LOSSES.md §2.1).

Ops (student ``[N, Ds]``, teacher ``[N, Dt]``, ``reduction`` in ``"mean" | "sum" | "none"``):

``kd_kernels::rkd_distance_fwd_cuda(Tensor student, Tensor teacher, str reduction)
-> (Tensor loss, Tensor mu_s, Tensor mu_t)``
    ``loss``: 0-dim, or the ``[N, N]`` per-pair smooth-L1 terms for ``"none"``, in the student's
    dtype. ``mu_s``, ``mu_t``: 0-dim mean off-diagonal distances of student and teacher, float32
    (float64 if either input is float64: the compute dtype), saved for the backward. Needs ``N >= 2``.

``kd_kernels::rkd_distance_bwd_cuda(Tensor grad, Tensor student, Tensor teacher, Tensor mu_s,
Tensor mu_t, str reduction, bool need_student, bool need_teacher)
-> (Tensor grad_student, Tensor grad_teacher)``
    ``grad`` has the loss's shape. Each gradient has its input's shape and dtype (contiguous), or
    is an empty tensor (``numel() == 0``) when its ``need_*`` flag is False.

``kd_kernels::rkd_angle_fwd_cuda(Tensor student, Tensor teacher, str reduction) -> Tensor``
    0-dim, or ``[N]`` per-anchor means over the N² (b, c) pairs for ``"none"``, in the student's
    dtype.

``kd_kernels::rkd_angle_bwd_cuda(Tensor grad, Tensor student, Tensor teacher, str reduction,
bool need_student, bool need_teacher) -> (Tensor grad_student, Tensor grad_teacher)``
    As ``rkd_distance_bwd_cuda``.
"""

from __future__ import annotations

import torch

__all__ = ["RKD_CUDA_OPS"]

# Fully qualified names of the ops defined here (and implemented on CUDA by kd_kernels._C).
RKD_CUDA_OPS = (
    "kd_kernels::rkd_distance_fwd_cuda",
    "kd_kernels::rkd_distance_bwd_cuda",
    "kd_kernels::rkd_angle_fwd_cuda",
    "kd_kernels::rkd_angle_bwd_cuda",
)

# Keep a reference: the definitions are removed when the Library object is garbage-collected.
_lib = torch.library.Library("kd_kernels", "FRAGMENT")
_lib.define(
    "rkd_distance_fwd_cuda(Tensor student, Tensor teacher, str reduction) -> (Tensor loss, Tensor mu_s, Tensor mu_t)"
)
_lib.define(
    "rkd_distance_bwd_cuda(Tensor grad, Tensor student, Tensor teacher, Tensor mu_s, Tensor mu_t, str reduction, "
    "bool need_student, bool need_teacher) -> (Tensor grad_student, Tensor grad_teacher)"
)
_lib.define("rkd_angle_fwd_cuda(Tensor student, Tensor teacher, str reduction) -> Tensor")
_lib.define(
    "rkd_angle_bwd_cuda(Tensor grad, Tensor student, Tensor teacher, str reduction, bool need_student, "
    "bool need_teacher) -> (Tensor grad_student, Tensor grad_teacher)"
)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, op: str) -> None:
    torch._check(student.dim() == 2, lambda: f"{op}: student must be [N, Ds], got shape {tuple(student.shape)}")
    torch._check(teacher.dim() == 2, lambda: f"{op}: teacher must be [N, Dt], got shape {tuple(teacher.shape)}")
    torch._check(
        teacher.shape[0] == student.shape[0],
        lambda: f"{op}: teacher must have the student's N = {student.shape[0]} rows, got {teacher.shape[0]}",
    )


def _stat_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """Dtype of mu_s / mu_t (the compute dtype): float64 if either input is float64, else float32."""
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def _grads(student: torch.Tensor, teacher: torch.Tensor, need_student: bool, need_teacher: bool):
    gs = student.new_empty(student.shape) if need_student else student.new_empty(0)
    gt = teacher.new_empty(teacher.shape) if need_teacher else teacher.new_empty(0)
    return gs, gt


@torch.library.register_fake("kd_kernels::rkd_distance_fwd_cuda")
def _rkd_distance_fwd_cuda_fake(
    student: torch.Tensor, teacher: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_pair(student, teacher, "rkd_distance_fwd_cuda")
    n = student.shape[0]
    loss = student.new_empty((n, n) if reduction == "none" else ())
    dtype = _stat_dtype(student, teacher)
    return loss, student.new_empty((), dtype=dtype), student.new_empty((), dtype=dtype)


@torch.library.register_fake("kd_kernels::rkd_distance_bwd_cuda")
def _rkd_distance_bwd_cuda_fake(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    mu_s: torch.Tensor,
    mu_t: torch.Tensor,
    reduction: str,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pair(student, teacher, "rkd_distance_bwd_cuda")
    return _grads(student, teacher, need_student, need_teacher)


@torch.library.register_fake("kd_kernels::rkd_angle_fwd_cuda")
def _rkd_angle_fwd_cuda_fake(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> torch.Tensor:
    _check_pair(student, teacher, "rkd_angle_fwd_cuda")
    return student.new_empty((student.shape[0],) if reduction == "none" else ())


@torch.library.register_fake("kd_kernels::rkd_angle_bwd_cuda")
def _rkd_angle_bwd_cuda_fake(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    reduction: str,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pair(student, teacher, "rkd_angle_bwd_cuda")
    return _grads(student, teacher, need_student, need_teacher)
