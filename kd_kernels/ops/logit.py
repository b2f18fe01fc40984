"""Custom ops of the logit losses (math: docs/logit.md), defined with
:func:`kd_kernels.ops._define.define_loss_op` (autograd, dispatch on the resolved ``backend``,
float64 routing, the double-backward error).

Ops (all in the ``kd_kernels`` namespace; ``backend`` is already resolved):

- ``{kd,reverse_kl,tvd}_fwd(student, teacher, temperature, ignore_mask, backend)`` and
  ``jsd_fwd(student, teacher, beta, temperature, ignore_mask, backend)``
  -> ``(row_loss [N], lse_s [N], lse_t [N])``
- ``<loss>_bwd(grad_row, student, teacher, lse_s, lse_t, <the fwd's float args>, ignore_mask,
  need_student, need_teacher, backend)`` -> ``(grad_student, grad_teacher)``
- ``dist_fwd(student, teacher, temperature, inter_weight, intra_weight, ignore_mask, backend)``
  -> ``(loss [], lse_s [N], lse_t [N], class_stats [5, C])``
- ``dist_bwd(grad, student, teacher, lse_s, lse_t, class_stats, temperature, inter_weight,
  intra_weight, ignore_mask, need_student, need_teacher, backend)`` -> ``(grad_student, grad_teacher)``
- ``grkd_fwd(student, teacher, temperature, top_k, ignore_mask, backend)`` -> ``(loss [], pair_count [N] int64)``
- ``grkd_bwd(grad, student, teacher, pair_count, temperature, top_k, ignore_mask, backend)`` -> ``grad_student``
  (the teacher gets no gradient: the loss is piecewise constant in it)

``row_loss``, ``lse_*``, ``loss`` and ``class_stats`` are float32 (float64 for float64
inputs); ``row_loss`` is 0 on ignored rows and, for kd, includes T^2. Gradients have each
input's dtype; one that is not needed is an empty tensor (and None in autograd).

Each backend table (``_KERNELS[loss]``: backend -> (forward, backward)) maps a resolved backend
to functions with exactly the op's arguments minus ``backend``; a new backend is one entry there
plus its name in ``_KERNELS`` of ``kd_kernels/losses/logit.py``.

CUDA C++ Hinton KD: plain functions of the compiled extension ``kd_kernels._C``
(``csrc/cuda/logit.cu``), called directly by the adapters below:

``kd_fwd_cuda(student, teacher, temperature) -> (row_loss, lse_s, lse_t)``
    logits ``[N, C]`` of one floating dtype on a CUDA device;
    ``row_loss[r] = T² · KL(p_r ‖ q_r)`` with ``p = softmax(teacher / T)``, ``q = softmax(student / T)``;
    ``lse_s``, ``lse_t`` the row log-sum-exps of ``student / T`` and ``teacher / T``. All three
    ``[N]`` in float32 (float64 for float64 logits; the ops route float64 to the torch path).
``kd_bwd_cuda(grad_row, student, teacher, lse_s, lse_t, temperature) -> grad_student``
    ``grad_student[r, c] = grad_row[r] · T · (q[r, c] − p[r, c])``, ``[N, C]`` contiguous in the
    student's dtype.

Bad arguments raise ``RuntimeError`` naming the argument.
"""

from __future__ import annotations

import torch

from kd_kernels.ops._define import cuda_function, define_loss_op, lazy
from kd_kernels.torch_impl import logit as _impl

__all__: list[str] = []

# --- CUDA C++ Hinton KD --------------------------------------------------------------------
# The C++ functions take one dtype and no mask; these adapters give them the torch_impl
# contract: rows whose ignore_mask is set get 0 loss and 0 gradient, and a teacher that requires
# grad gets its gradient from the PyTorch path (the kernel computes the student's only).
_TRITON = "kd_kernels.triton.logit"  # Hinton KD, reverse KL and TVD launchers (fp32 / fp16 / bf16)
_kd_fwd_c = cuda_function("kd_fwd_cuda")
_kd_bwd_c = cuda_function("kd_bwd_cuda")


def _common_dtype(student, teacher):
    return student.dtype if student.dtype == teacher.dtype else _impl.compute_dtype(student, teacher)


def _kd_fwd_cuda(student, teacher, temperature, ignore_mask):
    dtype = _common_dtype(student, teacher)
    rows, lse_s, lse_t = _kd_fwd_c(student.to(dtype), teacher.to(dtype), float(temperature))
    if ignore_mask is not None:
        rows = torch.where(ignore_mask, rows.new_zeros(()), rows)
    return rows, lse_s, lse_t


def _kd_bwd_cuda(grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, need_student, need_teacher):
    gs = student.new_empty(0)
    if need_student:
        dtype = _common_dtype(student, teacher)
        gs = _kd_bwd_c(grad_row, student.to(dtype), teacher.to(dtype), lse_s, lse_t, float(temperature))
        gs = gs.to(student.dtype)
        if ignore_mask is not None:
            gs = torch.where(ignore_mask[:, None], gs.new_zeros(()), gs)
    gt = teacher.new_empty(0)
    if need_teacher:
        gt = _impl.kd_bwd(grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, False, True)[1]
    return gs, gt


# loss -> backend -> (forward, backward).
_KERNELS: dict[str, dict] = {
    "kd": {
        "torch": (_impl.kd_fwd, _impl.kd_bwd),
        "cuda": (_kd_fwd_cuda, _kd_bwd_cuda),
        "triton": (lazy(_TRITON, "kd_fwd_triton"), lazy(_TRITON, "kd_bwd_triton")),
    },
    "reverse_kl": {
        "torch": (_impl.reverse_kl_fwd, _impl.reverse_kl_bwd),
        "triton": (lazy(_TRITON, "reverse_kl_fwd_triton"), lazy(_TRITON, "reverse_kl_bwd_triton")),
    },
    "jsd": {"torch": (_impl.jsd_fwd, _impl.jsd_bwd)},
    "tvd": {
        "torch": (_impl.tvd_fwd, _impl.tvd_bwd),
        "triton": (lazy(_TRITON, "tvd_fwd_triton"), lazy(_TRITON, "tvd_bwd_triton")),
    },
    "dist": {"torch": (_impl.dist_fwd, _impl.dist_bwd)},
    "grkd": {"torch": (_impl.grkd_fwd, _impl.grkd_bwd)},
}


def _rows(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return student.new_empty((student.shape[0],), dtype=_impl.compute_dtype(student, teacher))


# ---------------------------------------------------------------------------------------
# kd / reverse_kl / jsd / tvd: one op pair per loss, from one contract.
# ---------------------------------------------------------------------------------------


def _define_divergence(loss: str, scalars: tuple[str, ...]):
    """``kd_kernels::<loss>_fwd`` / ``_bwd`` with the float arguments ``scalars``."""
    sc = "".join(f"float {name}, " for name in scalars)
    return define_loss_op(
        loss,
        fwd_schema=(
            f"(Tensor student, Tensor teacher, {sc}Tensor? ignore_mask, str backend) "
            "-> (Tensor row_loss, Tensor lse_s, Tensor lse_t)"
        ),
        bwd_schema=(
            f"(Tensor grad_row, Tensor student, Tensor teacher, Tensor lse_s, Tensor lse_t, {sc}Tensor? ignore_mask, "
            "bool need_student, bool need_teacher, str backend) -> (Tensor grad_student, Tensor grad_teacher)"
        ),
        fake_fwd=lambda student, teacher, *_: tuple(_rows(student, teacher) for _ in range(3)),
        kernels=_KERNELS[loss],
    )


kd_fwd, kd_bwd = _define_divergence("kd", ("temperature",))
reverse_kl_fwd, reverse_kl_bwd = _define_divergence("reverse_kl", ("temperature",))
jsd_fwd, jsd_bwd = _define_divergence("jsd", ("beta", "temperature"))
tvd_fwd, tvd_bwd = _define_divergence("tvd", ("temperature",))


# ---------------------------------------------------------------------------------------
# DIST
# ---------------------------------------------------------------------------------------


def _dist_fake(student, teacher, temperature, inter_weight, intra_weight, ignore_mask):
    dtype = _impl.compute_dtype(student, teacher)
    loss = student.new_empty((), dtype=dtype)
    stats = student.new_empty((5, student.shape[1]), dtype=dtype)
    return loss, _rows(student, teacher), _rows(student, teacher), stats


dist_fwd, dist_bwd = define_loss_op(
    "dist",
    fwd_schema=(
        "(Tensor student, Tensor teacher, float temperature, float inter_weight, float intra_weight, "
        "Tensor? ignore_mask, str backend) -> (Tensor loss, Tensor lse_s, Tensor lse_t, Tensor class_stats)"
    ),
    bwd_schema=(
        "(Tensor grad, Tensor student, Tensor teacher, Tensor lse_s, Tensor lse_t, Tensor class_stats, "
        "float temperature, float inter_weight, float intra_weight, Tensor? ignore_mask, bool need_student, "
        "bool need_teacher, str backend) -> (Tensor grad_student, Tensor grad_teacher)"
    ),
    fake_fwd=_dist_fake,
    kernels=_KERNELS["dist"],
)


# ---------------------------------------------------------------------------------------
# GRKD
# ---------------------------------------------------------------------------------------


def _grkd_fake(student, teacher, temperature, top_k, ignore_mask):
    loss = student.new_empty((), dtype=_impl.compute_dtype(student, teacher))
    return loss, student.new_empty((student.shape[0],), dtype=torch.int64)


grkd_fwd, grkd_bwd = define_loss_op(
    "grkd",
    fwd_schema=(
        "(Tensor student, Tensor teacher, float temperature, SymInt? top_k, Tensor? ignore_mask, str backend) "
        "-> (Tensor loss, Tensor pair_count)"
    ),
    bwd_schema=(
        "(Tensor grad, Tensor student, Tensor teacher, Tensor pair_count, float temperature, SymInt? top_k, "
        "Tensor? ignore_mask, str backend) -> Tensor grad_student"
    ),
    fake_fwd=_grkd_fake,
    kernels=_KERNELS["grkd"],
)
