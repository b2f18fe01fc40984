"""Custom ops of the logit losses: schema, fake, backend dispatch and autograd.

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

``row_loss``, ``lse_*``, ``loss`` and ``class_stats`` are float32 (float64 for float64
inputs); ``row_loss`` is 0 on ignored rows and, for kd, includes T^2. Gradients have each
input's dtype; one that is not needed is an empty tensor (and None in autograd).

Each backend table below maps a resolved backend to a function with exactly the op's
arguments minus ``backend``. A CUDA C++ kernel for Hinton KD plugs in as one line per
direction, looked up lazily because ``kd_kernels._C`` loads on first use, e.g.
``_FWD["kd"]["cuda"] = lambda *a: _cuda_op("kd_fwd_cuda")(*a)`` with ``_cuda_op`` calling
``kd_kernels._backend.load_extension()`` and returning ``getattr(torch.ops.kd_kernels, name)``,
provided the kernels follow the contract of ``torch_impl.logit.kd_fwd`` / ``kd_bwd``; then add
"cuda" to ``_KERNELS["kd_loss"]`` in ``kd_kernels/losses/logit.py``.
"""

from __future__ import annotations

import torch

from kd_kernels.ops import cuda_defs as _cuda_defs  # noqa: F401  (defines the kd_*_cuda schemas)
from kd_kernels.torch_impl import logit as _impl

__all__: list[str] = []

# backend -> kernel, per loss. Other backends ("triton", "cuda") are added here when built.
_FWD: dict[str, dict] = {
    "kd": {"torch": _impl.kd_fwd},
    "reverse_kl": {"torch": _impl.reverse_kl_fwd},
    "jsd": {"torch": _impl.jsd_fwd},
    "tvd": {"torch": _impl.tvd_fwd},
    "dist": {"torch": _impl.dist_fwd},
    "grkd": {"torch": _impl.grkd_fwd},
}
_BWD: dict[str, dict] = {
    "kd": {"torch": _impl.kd_bwd},
    "reverse_kl": {"torch": _impl.reverse_kl_bwd},
    "jsd": {"torch": _impl.jsd_bwd},
    "tvd": {"torch": _impl.tvd_bwd},
    "dist": {"torch": _impl.dist_bwd},
    "grkd": {"torch": _impl.grkd_bwd},
}


# --- CUDA C++ Hinton KD (csrc/cuda/logit.cu; schemas in kd_kernels/ops/cuda_defs.py) -------
# The C++ ops take one dtype and no mask; these adapters give them the torch_impl contract:
# rows whose ignore_mask is set get 0 loss and 0 gradient, and a teacher that requires grad
# gets its gradient from the PyTorch path (the kernel computes the student's only).


def _kd_fwd_cuda(student, teacher, temperature, ignore_mask):
    from kd_kernels._backend import load_extension

    load_extension()
    dtype = student.dtype if student.dtype == teacher.dtype else _impl.compute_dtype(student, teacher)
    rows, lse_s, lse_t = torch.ops.kd_kernels.kd_fwd_cuda(student.to(dtype), teacher.to(dtype), float(temperature))
    if ignore_mask is not None:
        rows = torch.where(ignore_mask, rows.new_zeros(()), rows)
    return rows, lse_s, lse_t


def _kd_bwd_cuda(grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, need_student, need_teacher):
    gs = student.new_empty(0)
    if need_student:
        dtype = student.dtype if student.dtype == teacher.dtype else _impl.compute_dtype(student, teacher)
        gs = torch.ops.kd_kernels.kd_bwd_cuda(
            grad_row, student.to(dtype), teacher.to(dtype), lse_s, lse_t, float(temperature)
        ).to(student.dtype)
        if ignore_mask is not None:
            gs = torch.where(ignore_mask[:, None], gs.new_zeros(()), gs)
    gt = teacher.new_empty(0)
    if need_teacher:
        gt = _impl.kd_bwd(grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, False, True)[1]
    return gs, gt


_FWD["kd"]["cuda"] = _kd_fwd_cuda
_BWD["kd"]["cuda"] = _kd_bwd_cuda


def _kernel(table: dict, loss: str, direction: str, backend: str):
    fn = table[loss].get(backend)
    if fn is None:
        raise NotImplementedError(
            f"kd_kernels::{loss}_{direction}: no {backend!r} kernel (available: {tuple(table[loss])})"
        )
    return fn


def _fake_rows(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return student.new_empty((student.shape[0],), dtype=_impl.compute_dtype(student, teacher))


def _fake_grads(student, teacher, need_student: bool, need_teacher: bool):
    gs = torch.empty_like(student) if need_student else student.new_empty(0)
    gt = torch.empty_like(teacher) if need_teacher else teacher.new_empty(0)
    return gs, gt


# ---------------------------------------------------------------------------------------
# kd / reverse_kl / jsd / tvd: one op pair per loss, built from one template.
# ---------------------------------------------------------------------------------------


def _define_divergence(loss: str, scalars: tuple[str, ...]):
    """Define ``kd_kernels::<loss>_fwd`` / ``_bwd`` with the float args ``scalars``."""
    sc = "".join(f"float {name}, " for name in scalars)
    k = len(scalars)

    def fwd_impl(*args):
        return _kernel(_FWD, loss, "fwd", args[-1])(*args[:-1])

    def bwd_impl(*args):
        return _kernel(_BWD, loss, "bwd", args[-1])(*args[:-1])

    fwd = torch.library.custom_op(
        f"kd_kernels::{loss}_fwd",
        mutates_args=(),
        schema=f"(Tensor student, Tensor teacher, {sc}Tensor? ignore_mask, str backend) -> (Tensor, Tensor, Tensor)",
    )(fwd_impl)
    bwd = torch.library.custom_op(
        f"kd_kernels::{loss}_bwd",
        mutates_args=(),
        schema=(
            f"(Tensor grad_row, Tensor student, Tensor teacher, Tensor lse_s, Tensor lse_t, {sc}"
            "Tensor? ignore_mask, bool need_student, bool need_teacher, str backend) -> (Tensor, Tensor)"
        ),
    )(bwd_impl)

    @fwd.register_fake
    def _fwd_fake(student, teacher, *rest):
        return _fake_rows(student, teacher), _fake_rows(student, teacher), _fake_rows(student, teacher)

    @bwd.register_fake
    def _bwd_fake(grad_row, student, teacher, lse_s, lse_t, *rest):
        need_student, need_teacher = rest[k + 1], rest[k + 2]
        return _fake_grads(student, teacher, need_student, need_teacher)

    def setup_context(ctx, inputs, output):
        student, teacher = inputs[0], inputs[1]
        ctx.scalars = tuple(inputs[2 : 2 + k])
        ignore_mask, ctx.backend = inputs[2 + k], inputs[3 + k]
        ctx.save_for_backward(student, teacher, output[1], output[2], ignore_mask)
        ctx.mark_non_differentiable(output[1], output[2])

    def backward(ctx, grad_row, _grad_lse_s, _grad_lse_t):
        student, teacher, lse_s, lse_t, ignore_mask = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gs, gt = bwd(grad_row, student, teacher, lse_s, lse_t, *ctx.scalars, ignore_mask, need_s, need_t, ctx.backend)
        return (gs if need_s else None, gt if need_t else None) + (None,) * (k + 2)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd, bwd


kd_fwd, kd_bwd = _define_divergence("kd", ("temperature",))
reverse_kl_fwd, reverse_kl_bwd = _define_divergence("reverse_kl", ("temperature",))
jsd_fwd, jsd_bwd = _define_divergence("jsd", ("beta", "temperature"))
tvd_fwd, tvd_bwd = _define_divergence("tvd", ("temperature",))


# ---------------------------------------------------------------------------------------
# DIST
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("kd_kernels::dist_fwd", mutates_args=())
def dist_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    inter_weight: float,
    intra_weight: float,
    ignore_mask: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _kernel(_FWD, "dist", "fwd", backend)
    return fn(student, teacher, temperature, inter_weight, intra_weight, ignore_mask)


@dist_fwd.register_fake
def _dist_fwd_fake(student, teacher, temperature, inter_weight, intra_weight, ignore_mask, backend):
    dtype = _impl.compute_dtype(student, teacher)
    loss = student.new_empty((), dtype=dtype)
    stats = student.new_empty((5, student.shape[1]), dtype=dtype)
    return loss, _fake_rows(student, teacher), _fake_rows(student, teacher), stats


@torch.library.custom_op("kd_kernels::dist_bwd", mutates_args=())
def dist_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    class_stats: torch.Tensor,
    temperature: float,
    inter_weight: float,
    intra_weight: float,
    ignore_mask: torch.Tensor | None,
    need_student: bool,
    need_teacher: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _kernel(_BWD, "dist", "bwd", backend)
    return fn(
        grad,
        student,
        teacher,
        lse_s,
        lse_t,
        class_stats,
        temperature,
        inter_weight,
        intra_weight,
        ignore_mask,
        need_student,
        need_teacher,
    )


@dist_bwd.register_fake
def _dist_bwd_fake(grad, student, teacher, *rest):
    return _fake_grads(student, teacher, rest[-3], rest[-2])


def _dist_setup(ctx, inputs, output):
    student, teacher, temperature, inter_weight, intra_weight, ignore_mask, backend = inputs
    ctx.scalars = (temperature, inter_weight, intra_weight)
    ctx.backend = backend
    ctx.save_for_backward(student, teacher, output[1], output[2], output[3], ignore_mask)
    ctx.mark_non_differentiable(output[1], output[2], output[3])


def _dist_backward(ctx, grad, _g_lse_s, _g_lse_t, _g_stats):
    student, teacher, lse_s, lse_t, stats, ignore_mask = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gs, gt = dist_bwd(
        grad, student, teacher, lse_s, lse_t, stats, *ctx.scalars, ignore_mask, need_s, need_t, ctx.backend
    )
    return gs if need_s else None, gt if need_t else None, None, None, None, None, None


dist_fwd.register_autograd(_dist_backward, setup_context=_dist_setup)


# ---------------------------------------------------------------------------------------
# GRKD (the teacher gets no gradient: the loss is piecewise constant in it)
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("kd_kernels::grkd_fwd", mutates_args=())
def grkd_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    top_k: int | None,
    ignore_mask: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernel(_FWD, "grkd", "fwd", backend)(student, teacher, temperature, top_k, ignore_mask)


@grkd_fwd.register_fake
def _grkd_fwd_fake(student, teacher, temperature, top_k, ignore_mask, backend):
    loss = student.new_empty((), dtype=_impl.compute_dtype(student, teacher))
    return loss, student.new_empty((student.shape[0],), dtype=torch.int64)


@torch.library.custom_op("kd_kernels::grkd_bwd", mutates_args=())
def grkd_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    pair_count: torch.Tensor,
    temperature: float,
    top_k: int | None,
    ignore_mask: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    fn = _kernel(_BWD, "grkd", "bwd", backend)
    return fn(grad, student, teacher, pair_count, temperature, top_k, ignore_mask)


@grkd_bwd.register_fake
def _grkd_bwd_fake(grad, student, teacher, pair_count, temperature, top_k, ignore_mask, backend):
    return torch.empty_like(student)


def _grkd_setup(ctx, inputs, output):
    student, teacher, temperature, top_k, ignore_mask, backend = inputs
    ctx.args = (temperature, top_k)
    ctx.backend = backend
    ctx.save_for_backward(student, teacher, output[1], ignore_mask)
    ctx.mark_non_differentiable(output[1])


def _grkd_backward(ctx, grad, _g_pairs):
    student, teacher, pairs, ignore_mask = ctx.saved_tensors
    gs = (
        grkd_bwd(grad, student, teacher, pairs, *ctx.args, ignore_mask, ctx.backend)
        if ctx.needs_input_grad[0]
        else None
    )
    return gs, None, None, None, None, None


grkd_fwd.register_autograd(_grkd_backward, setup_context=_grkd_setup)
