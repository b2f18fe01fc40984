"""Schemas and fake (meta) implementations of the ops that the CUDA C++ extension implements.

The compiled library ``kd_kernels._C`` registers CUDA kernels for these ops
(``TORCH_LIBRARY_IMPL(kd_kernels, CUDA, m)`` in ``csrc/cuda/<stem>.cu``); the schemas are
defined here, in Python, so that the ops exist, and fake tensors and ``torch.compile`` trace
through them, whether or not the extension was built and whether or not a GPU is present.
Calling one of them on a device that has no kernel raises ``NotImplementedError``.

This module is import-safe: it imports neither ``kd_kernels._C`` nor Triton, and touches no GPU.
``kd_kernels._C`` imports it when it loads, so loading the extension always defines the schemas.

Ops:

``kd_kernels::kd_fwd_cuda(Tensor student, Tensor teacher, float temperature)
-> (Tensor row_loss, Tensor lse_s, Tensor lse_t)``
    Hinton KD forward (LOSSES.md §9.1) for logits ``[N, C]`` of one floating dtype:
    ``row_loss[r] = T² · KL(p_r ‖ q_r)`` with ``p = softmax(teacher / T)``,
    ``q = softmax(student / T)``; ``lse_s``, ``lse_t`` are the row log-sum-exps of
    ``student / T`` and ``teacher / T``. All three are ``[N]`` in float32 (float64 when the
    logits are float64).

``kd_kernels::kd_bwd_cuda(Tensor grad_row, Tensor student, Tensor teacher, Tensor lse_s,
Tensor lse_t, float temperature) -> Tensor``
    ``grad_student[r, c] = grad_row[r] · T · (q[r, c] − p[r, c])``, ``[N, C]`` (contiguous) in
    the student's dtype.
"""

from __future__ import annotations

import torch

from kd_kernels.ops.rkd_cuda_defs import RKD_CUDA_OPS  # the RKD ops' schemas live beside their kernels' docs

__all__ = ["CUDA_OPS"]

# Fully qualified names of the ops defined here (and implemented on CUDA by kd_kernels._C).
CUDA_OPS = ("kd_kernels::kd_fwd_cuda", "kd_kernels::kd_bwd_cuda", *RKD_CUDA_OPS)

# Keep a reference: the definitions are removed when the Library object is garbage-collected.
_lib = torch.library.Library("kd_kernels", "FRAGMENT")
_lib.define(
    "kd_fwd_cuda(Tensor student, Tensor teacher, float temperature) -> (Tensor row_loss, Tensor lse_s, Tensor lse_t)"
)
_lib.define(
    "kd_bwd_cuda(Tensor grad_row, Tensor student, Tensor teacher, Tensor lse_s, Tensor lse_t, "
    "float temperature) -> Tensor"
)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the row statistics: float64 for float64 logits, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_logits(student: torch.Tensor, teacher: torch.Tensor, op: str) -> None:
    torch._check(student.dim() == 2, lambda: f"{op}: student must be [N, C], got shape {tuple(student.shape)}")
    torch._check(
        teacher.shape == student.shape,
        lambda: f"{op}: teacher must have the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}",
    )


@torch.library.register_fake("kd_kernels::kd_fwd_cuda")
def _kd_fwd_cuda_fake(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_logits(student, teacher, "kd_fwd_cuda")
    n = student.shape[0]
    dtype = _stat_dtype(student.dtype)
    return student.new_empty(n, dtype=dtype), student.new_empty(n, dtype=dtype), student.new_empty(n, dtype=dtype)


@torch.library.register_fake("kd_kernels::kd_bwd_cuda")
def _kd_bwd_cuda_fake(
    grad_row: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    _check_logits(student, teacher, "kd_bwd_cuda")
    return student.new_empty(student.shape)
