"""Custom ops of the RKD family (math: docs/rkd.md): ``kd_kernels::rkd_distance_fwd`` / ``_bwd``
and ``kd_kernels::rkd_angle_fwd`` / ``_bwd``, defined with :func:`kd_kernels.ops._define.define_loss_op`
(autograd, dispatch on the resolved ``backend``, float64 routing, the double-backward error).

Inputs are validated once in ``kd_kernels/losses/rkd.py``, never here. Student ``[N, Ds]``,
teacher ``[N, Dt]``, ``reduction`` in ``"mean" | "sum" | "none"``.

Kernels (``_DISTANCE`` / ``_ANGLE``: backend -> (forward, backward)) take the op's arguments
minus ``backend``:

- ``"torch"``: ``kd_kernels.torch_impl.rkd`` (every dtype; float64 always runs here).
- ``"triton"``: ``kd_kernels.triton.rkd`` launchers (fp32 / fp16 / bf16).
- ``"cuda"``: plain functions of the compiled extension ``kd_kernels._C`` (``csrc/cuda/``),
  called with ``precision = kd_kernels._backend.fp32_dot_precision()`` appended:

  ``rkd_distance_fwd_cuda(student, teacher, reduction, precision) -> (loss, mu_s, mu_t)``
      ``loss`` 0-dim, or ``[N, N]`` per-pair terms for ``"none"``, in the student's dtype;
      ``mu_s``, ``mu_t`` 0-dim float32 mean off-diagonal distances. Needs ``N >= 2``.
  ``rkd_distance_bwd_cuda(grad, student, teacher, mu_s, mu_t, reduction, need_student,
  need_teacher, precision) -> (grad_student, grad_teacher)``
      each gradient contiguous in its input's shape and dtype, or an empty tensor when its
      ``need_*`` flag is False.
  ``rkd_angle_fwd_cuda(student, teacher, reduction, precision) -> loss``
      0-dim, or ``[N]`` per-anchor means for ``"none"``, in the student's dtype.
  ``rkd_angle_bwd_cuda(grad, student, teacher, reduction, need_student, need_teacher,
  precision) -> (grad_student, grad_teacher)``
      as ``rkd_distance_bwd_cuda``.

  Inputs are fp32 / fp16 / bf16 CUDA tensors (float64 never reaches them); ``precision`` is
  ``"tf32x3"`` or ``"tf32"`` (docs/precision.md). Bad arguments raise ``RuntimeError``.
"""

from __future__ import annotations

from kd_kernels.ops._define import cuda_function, define_loss_op, lazy
from kd_kernels.torch_impl import rkd as _torch_impl

__all__ = ["rkd_angle_bwd", "rkd_angle_fwd", "rkd_distance_bwd", "rkd_distance_fwd"]

_TRITON = "kd_kernels.triton.rkd"

_DISTANCE = {
    "torch": (_torch_impl.rkd_distance_fwd, _torch_impl.rkd_distance_bwd),
    "triton": (lazy(_TRITON, "rkd_distance_fwd_triton"), lazy(_TRITON, "rkd_distance_bwd_triton")),
    "cuda": (
        cuda_function("rkd_distance_fwd_cuda", precision=True),
        cuda_function("rkd_distance_bwd_cuda", precision=True),
    ),
}
_ANGLE = {
    "torch": (_torch_impl.rkd_angle_fwd, _torch_impl.rkd_angle_bwd),
    "triton": (lazy(_TRITON, "rkd_angle_fwd_triton"), lazy(_TRITON, "rkd_angle_bwd_triton")),
    "cuda": (
        cuda_function("rkd_angle_fwd_cuda", precision=True),
        cuda_function("rkd_angle_bwd_cuda", precision=True),
    ),
}


def _distance_fake(student, teacher, reduction):
    n = student.shape[0]
    dtype = _torch_impl.compute_dtype(student, teacher)
    loss = student.new_empty((n, n) if reduction == "none" else ())
    return loss, student.new_empty((), dtype=dtype), student.new_empty((), dtype=dtype)


def _angle_fake(student, teacher, reduction):
    return student.new_empty((student.shape[0],) if reduction == "none" else ())


# (loss, mu_s, mu_t): loss 0-dim or [N, N] ("none"); mu_* 0-dim, saved for the backward.
rkd_distance_fwd, rkd_distance_bwd = define_loss_op(
    "rkd_distance",
    fwd_schema="(Tensor student, Tensor teacher, str reduction, str backend) -> (Tensor loss, Tensor mu_s, Tensor mu_t)",
    bwd_schema=(
        "(Tensor grad, Tensor student, Tensor teacher, Tensor mu_s, Tensor mu_t, str reduction, bool need_student, "
        "bool need_teacher, str backend) -> (Tensor grad_student, Tensor grad_teacher)"
    ),
    fake_fwd=_distance_fake,
    kernels=_DISTANCE,
)

# loss: 0-dim or [N] ("none", per-anchor means).
rkd_angle_fwd, rkd_angle_bwd = define_loss_op(
    "rkd_angle",
    fwd_schema="(Tensor student, Tensor teacher, str reduction, str backend) -> Tensor loss",
    bwd_schema=(
        "(Tensor grad, Tensor student, Tensor teacher, str reduction, bool need_student, bool need_teacher, "
        "str backend) -> (Tensor grad_student, Tensor grad_teacher)"
    ),
    fake_fwd=_angle_fake,
    kernels=_ANGLE,
)
