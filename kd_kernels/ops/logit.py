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

CUDA C++ divergences: plain functions of the compiled extension ``kd_kernels._C``
(``csrc/cuda/logit.cu``), called directly by the adapters below:

``kd_fwd_cuda(student, teacher, temperature) -> (row_loss, lse_s, lse_t)``
    logits ``[N, C]`` of one floating dtype on a CUDA device;
    ``row_loss[r] = T² · KL(p_r ‖ q_r)`` with ``p = softmax(teacher / T)``, ``q = softmax(student / T)``;
    ``lse_s``, ``lse_t`` the row log-sum-exps of ``student / T`` and ``teacher / T``. All three
    ``[N]`` in float32 (float64 for float64 logits; the ops route float64 to the torch path).
``kd_bwd_cuda(grad_row, student, teacher, lse_s, lse_t, temperature) -> grad_student``
    ``grad_student[r, c] = grad_row[r] · T · (q[r, c] − p[r, c])``, ``[N, C]`` contiguous in the
    student's dtype.
``divergence_fwd_cuda(kind, student, teacher, temperature, beta) -> (row_loss, lse_s, lse_t)``
``divergence_bwd_cuda(kind, grad_row, student, teacher, lse_s, lse_t, temperature, beta) -> grad_student``
    the same contract for ``kind`` in ``"kd" | "reverse_kl" | "jsd" | "tvd"`` (one kernel template;
    the two kd functions are its "kd" instance); ``beta`` is read for "jsd" only (0 and 1 are
    forward KL without T² and reverse KL, the torch path's endpoint rule). ``row_loss`` is the
    torch_impl row value of that loss; ``grad_student = grad_row[r] · d row_loss[r] / d student``.

Bad arguments raise ``RuntimeError`` naming the argument.
"""

from __future__ import annotations

import torch

from kd_kernels import _backend
from kd_kernels.ops._define import cuda_function, define_loss_op, lazy
from kd_kernels.torch_impl import logit as _impl

__all__: list[str] = []

# --- CUDA C++ divergence group (kd, reverse_kl, jsd, tvd) --------------------------------------
# The C++ functions take one dtype and no mask; one generic adapter pair per loss gives them the
# torch_impl contract: rows whose ignore_mask is set get 0 loss and 0 gradient, mixed dtypes are
# computed in their common dtype, and a teacher that requires grad gets its gradient from the
# PyTorch path (the kernels compute the student's only).
_TRITON = "kd_kernels.triton.logit"  # launchers of all six logit losses (fp32 / fp16 / bf16)
_kd_fwd_c = cuda_function("kd_fwd_cuda")
_kd_bwd_c = cuda_function("kd_bwd_cuda")
_div_fwd_c = cuda_function("divergence_fwd_cuda")
_div_bwd_c = cuda_function("divergence_bwd_cuda")


def _common_dtype(student, teacher):
    return student.dtype if student.dtype == teacher.dtype else _impl.compute_dtype(student, teacher)


def _cuda_divergence(kind: str, scalars: tuple[str, ...]):
    """``(forward, backward)`` adapters of the CUDA divergence kernels for ``kind``.

    ``scalars`` are the op's float arguments in schema order (``("temperature",)``, or
    ``("beta", "temperature")`` for jsd). The forward maps ``(student [N, C], teacher [N, C],
    *scalars, ignore_mask)`` to ``(row_loss [N], lse_s [N], lse_t [N])``; the backward maps
    ``(grad_row [N], student, teacher, lse_s, lse_t, *scalars, ignore_mask, need_student,
    need_teacher)`` to ``(grad_student [N, C] | empty, grad_teacher [N, C] | empty)``. "kd" calls
    ``kd_fwd_cuda`` / ``kd_bwd_cuda``, the others ``divergence_{fwd,bwd}_cuda(kind, ..., beta)``.
    """
    n = len(scalars)
    teacher_bwd = getattr(_impl, f"{kind}_bwd")

    def temperature_beta(values) -> tuple[float, float]:
        return _temperature_beta(scalars, values)

    def forward(student, teacher, *args):
        values, ignore_mask = args[:n], args[n]
        dtype = _common_dtype(student, teacher)
        s, t = student.to(dtype), teacher.to(dtype)
        temperature, beta = temperature_beta(values)
        if kind == "kd":
            rows, lse_s, lse_t = _kd_fwd_c(s, t, temperature)
        else:
            rows, lse_s, lse_t = _div_fwd_c(kind, s, t, temperature, beta)
        if ignore_mask is not None:
            rows = torch.where(ignore_mask, rows.new_zeros(()), rows)
        return rows, lse_s, lse_t

    def backward(grad_row, student, teacher, lse_s, lse_t, *args):
        values, (ignore_mask, need_student, need_teacher) = args[:n], args[n:]
        gs = student.new_empty(0)
        if need_student:
            dtype = _common_dtype(student, teacher)
            s, t = student.to(dtype), teacher.to(dtype)
            temperature, beta = temperature_beta(values)
            if kind == "kd":
                gs = _kd_bwd_c(grad_row, s, t, lse_s, lse_t, temperature)
            else:
                gs = _div_bwd_c(kind, grad_row, s, t, lse_s, lse_t, temperature, beta)
            gs = gs.to(student.dtype)
            if ignore_mask is not None:
                gs = torch.where(ignore_mask[:, None], gs.new_zeros(()), gs)
        gt = teacher.new_empty(0)
        if need_teacher:
            gt = teacher_bwd(grad_row, student, teacher, lse_s, lse_t, *values, ignore_mask, False, True)[1]
        return gs, gt

    forward.__name__, backward.__name__ = f"_{kind}_fwd_cuda", f"_{kind}_bwd_cuda"
    return forward, backward


_kd_fwd_cuda, _kd_bwd_cuda = _cuda_divergence("kd", ("temperature",))


def _temperature_beta(scalars: tuple[str, ...], values) -> tuple[float, float]:
    """(temperature, beta) from an op's float arguments ``values`` named ``scalars`` (beta 0 if absent)."""
    named = dict(zip(scalars, values, strict=True))
    return float(named["temperature"]), float(named.get("beta", 0.0))


# --- The "torch" backend of the divergence group: CPU C++ kernels where they apply ---------------
# On CPU tensors computed in float32 (fp32/fp16/bf16 inputs) the "torch" backend runs the fused C++
# loops of kd_kernels._C (csrc/cpu/logit.cpp: 2-4 reads of a row, no rows x vocab temporaries)
# when the extension is built and the CPU has AVX2 + FMA; everywhere else (float64, CUDA tensors,
# a pure-Python install) the PyTorch code of kd_kernels/torch_impl/logit.py. Both give the same
# values to float32 rounding. ``CPU_KERNELS = False`` forces the PyTorch code (tests, comparisons).
CPU_KERNELS = True


def _cpu_extension(student: torch.Tensor, teacher: torch.Tensor):
    """``kd_kernels._C`` when its CPU divergence kernels apply to these logits, else None."""
    if not CPU_KERNELS or student.device.type != "cpu" or teacher.device.type != "cpu":
        return None
    if _impl.compute_dtype(student, teacher) != torch.float32 or student.shape[1] == 0:
        return None
    ext = _backend.load_extension()
    if ext is None or not hasattr(ext, "divergence_fwd_cpu") or not ext.divergence_cpu_supported():
        return None
    return ext


def _torch_divergence(kind: str, scalars: tuple[str, ...]):
    """``(forward, backward)`` of the "torch" backend for ``kind`` (same contract as
    :func:`_cuda_divergence`): the CPU C++ kernels where :func:`_cpu_extension` allows, else
    ``torch_impl.logit.<kind>_fwd / _bwd``. The teacher's gradient (rare) is the PyTorch path's."""
    n = len(scalars)
    impl_fwd, impl_bwd = getattr(_impl, f"{kind}_fwd"), getattr(_impl, f"{kind}_bwd")

    def forward(student, teacher, *args):
        ext = _cpu_extension(student, teacher)
        if ext is None:
            return impl_fwd(student, teacher, *args)
        values, ignore_mask = args[:n], args[n]
        temperature, beta = _temperature_beta(scalars, values)
        keep = _impl._keep_rows(ignore_mask, student.shape[0], student.device)
        return ext.divergence_fwd_cpu(
            _impl._jsd_mode(kind, beta), student.float(), teacher.float(), keep, temperature, beta
        )

    def backward(grad_row, student, teacher, lse_s, lse_t, *args):
        values, (ignore_mask, need_student, need_teacher) = args[:n], args[n:]
        ext = _cpu_extension(student, teacher) if need_student else None
        if ext is None:
            return impl_bwd(grad_row, student, teacher, lse_s, lse_t, *args)
        temperature, beta = _temperature_beta(scalars, values)
        keep = _impl._keep_rows(ignore_mask, student.shape[0], student.device)
        gs = ext.divergence_bwd_cpu(
            _impl._jsd_mode(kind, beta), grad_row.float(), student.float(), teacher.float(), lse_s.float(),
            lse_t.float(), keep, temperature, beta,
        ).to(student.dtype)  # fmt: skip
        gt = teacher.new_empty(0)
        if need_teacher:
            gt = impl_bwd(grad_row, student, teacher, lse_s, lse_t, *values, ignore_mask, False, True)[1]
        return gs, gt

    forward.__name__, backward.__name__ = f"_{kind}_fwd_torch", f"_{kind}_bwd_torch"
    return forward, backward


# loss -> backend -> (forward, backward).
_KERNELS: dict[str, dict] = {
    "kd": {
        "torch": _torch_divergence("kd", ("temperature",)),
        "cuda": (_kd_fwd_cuda, _kd_bwd_cuda),
        "triton": (lazy(_TRITON, "kd_fwd_triton"), lazy(_TRITON, "kd_bwd_triton")),
    },
    "reverse_kl": {
        "torch": _torch_divergence("reverse_kl", ("temperature",)),
        "cuda": _cuda_divergence("reverse_kl", ("temperature",)),
        "triton": (lazy(_TRITON, "reverse_kl_fwd_triton"), lazy(_TRITON, "reverse_kl_bwd_triton")),
    },
    "jsd": {
        "torch": _torch_divergence("jsd", ("beta", "temperature")),
        "cuda": _cuda_divergence("jsd", ("beta", "temperature")),
        "triton": (lazy(_TRITON, "jsd_fwd_triton"), lazy(_TRITON, "jsd_bwd_triton")),
    },
    "tvd": {
        "torch": _torch_divergence("tvd", ("temperature",)),
        "cuda": _cuda_divergence("tvd", ("temperature",)),
        "triton": (lazy(_TRITON, "tvd_fwd_triton"), lazy(_TRITON, "tvd_bwd_triton")),
    },
    "dist": {
        "torch": (_impl.dist_fwd, _impl.dist_bwd),
        "triton": (lazy(_TRITON, "dist_fwd_triton"), lazy(_TRITON, "dist_bwd_triton")),
    },
    "grkd": {
        "torch": (_impl.grkd_fwd, _impl.grkd_bwd),
        "triton": (lazy(_TRITON, "grkd_fwd_triton"), lazy(_TRITON, "grkd_bwd_triton")),
    },
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
