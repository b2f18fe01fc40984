"""Fused-linear distillation losses: the LM head and KD / JSD in one pass, without ``[N, V]`` logits.

Inputs are the hidden states feeding each model's output head and the heads themselves:
student ``h_s [N, Hs]``, ``W_s [V, Hs]`` (optional ``b_s [V]``), teacher ``h_t [N, Ht]``,
``W_t [V, Ht]`` (optional ``b_t [V]``); rows are flattened tokens. The value and every gradient
equal those of :func:`kd_kernels.kd_loss` / :func:`kd_kernels.jsd_loss` applied to the logits

.. math::
    z_s = h_s W_s^\\top + b_s,\\qquad z_t = h_t W_t^\\top + b_t,

but the logits are only ever formed a chunk of rows at a time (about ``2**23`` logits per
chunk), and the forward saves two log-sum-exps per row (``kd_kernels/torch_impl/fused_linear.py``).

Memory: O(N) saved for the backward, O(V·H) for the weight gradients, a few chunk x V
temporaries; never O(N·V).

FLOPs: forward ``2·N·V·(Hs + Ht)`` (the two head GEMMs). The backward recomputes both
chunk logits (``2·N·V·(Hs + Ht)`` again: the recomputation overhead) and runs one GEMM of
``2·N·V·H`` per input that needs a gradient (student hidden, student weight; the teacher's
only when its tensors require grad; a bias gradient is a row sum).

Gradients: every input that requires grad gets one (teachers are usually detached and get
none). ``ignore_mask`` (bool or 0/1 ``[N]``, True = DROP the row) works as in the logit losses.
"""

from __future__ import annotations

import torch

from kd_kernels._backend import resolve_backend
from kd_kernels._validate import backend_choice, check_args, check_mask, check_tensor, choice, number
from kd_kernels.losses._module import LossModule
from kd_kernels.losses.logit import REDUCTIONS, _as_bool, _reduce
from kd_kernels.ops import fused_linear as _ops
from kd_kernels.ops._define import call

__all__ = ["FusedLinearJSDLoss", "FusedLinearKDLoss", "fused_linear_jsd_loss", "fused_linear_kd_loss"]

# Built kernels per loss (resolve_backend's ``kernels``), as kd_kernels/ops/fused_linear.py's backend table.
_KERNELS = {"fused_linear_kd_loss": ("torch", "triton"), "fused_linear_jsd_loss": ("torch", "triton")}

_TEMPERATURE = number(positive=True)
_ARGS = {
    "fused_linear_kd_loss": {"temperature": _TEMPERATURE, "reduction": choice(*REDUCTIONS), "backend": backend_choice},
    "fused_linear_jsd_loss": {
        "beta": number(lo=0.0, hi=1.0),
        "temperature": _TEMPERATURE,
        "reduction": choice(*REDUCTIONS),
        "backend": backend_choice,
    },
}


def _check_side(loss: str, side: str, hidden, weight, h: str) -> None:
    """One side's ``hidden [N, H]`` and ``weight [V, H]``."""
    hn, wn = f"{side}_hidden", f"{side}_weight"
    check_tensor(loss, hn, hidden, f"[N, {h}]")
    check_tensor(loss, wn, weight, f"[V, {h}]")
    if hidden.dim() != 2:
        raise ValueError(f"{loss}: {hn} must have shape [N, {h}], got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{loss}: {wn} must have shape [V, {h}], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{loss}: {wn} {tuple(weight.shape)} must have shape [V, {h}] with {h}={hidden.shape[1]} "
            f"from {hn} {tuple(hidden.shape)}"
        )
    if hidden.shape[1] < 1 or weight.shape[0] < 1:
        raise ValueError(f"{loss}: {h} and V must be >= 1, got {hn} {tuple(hidden.shape)}, {wn} {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{loss}: {wn} must have the dtype of {hn} ({hidden.dtype}), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{loss}: {wn} is on {weight.device} but {hn} is on {hidden.device}")


def _check_bias(loss: str, side: str, hidden, weight, bias) -> None:
    """One side's optional ``bias [V]``: None, or the head's V, dtype and device."""
    hn, wn, bn = f"{side}_hidden", f"{side}_weight", f"{side}_bias"
    if bias is None:
        return
    check_tensor(loss, bn, bias, "[V]")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{loss}: {bn} must have shape [V] with V={weight.shape[0]} from {wn}, got {tuple(bias.shape)}"
        )
    if bias.dtype != hidden.dtype:
        raise TypeError(f"{loss}: {bn} must have the dtype of {hn} ({hidden.dtype}), got {bias.dtype}")
    if bias.device != hidden.device:
        raise ValueError(f"{loss}: {bn} is on {bias.device} but {hn} is on {hidden.device}")


def _validate(loss, hs, ws, ht, wt, bs, bt, ignore_mask, **args):
    """Tensors (shapes [N, Hs] vs [V, Hs], [N, Ht] vs [V, Ht], same N, same V, bias [V]), then the keywords."""
    _check_side(loss, "student", hs, ws, "Hs")
    _check_side(loss, "teacher", ht, wt, "Ht")
    if hs.device != ht.device:
        raise ValueError(f"{loss}: student_hidden is on {hs.device} but teacher_hidden is on {ht.device}")
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(
            f"{loss}: student_hidden {tuple(hs.shape)} and teacher_hidden {tuple(ht.shape)} must have the same "
            "number of rows N"
        )
    if hs.shape[0] < 1:
        raise ValueError(f"{loss}: needs at least 1 rows (N >= 1), got N={hs.shape[0]}")
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"{loss}: student_weight {tuple(ws.shape)} and teacher_weight {tuple(wt.shape)} must have the same "
            "vocabulary size V (dim 0)"
        )
    _check_bias(loss, "student", hs, ws, bs)
    _check_bias(loss, "teacher", ht, wt, bt)
    check_args(loss, _ARGS[loss], **args)
    check_mask(loss, "ignore_mask", ignore_mask, (hs.shape[0],), hs.device)


def _fused(loss: str, op, hs, ws, bs, ht, wt, bt, scalars, reduction, ignore_mask, backend):
    backend = resolve_backend(backend, hs.device, loss=loss, kernels=_KERNELS[loss])
    mask = _as_bool(ignore_mask)
    bs = hs.new_empty(0) if bs is None else bs  # the ops take an empty tensor for "no bias"
    bt = ht.new_empty(0) if bt is None else bt
    rows, _, _ = call(op, hs, ws, bs, ht, wt, bt, *scalars, mask, backend)
    return _reduce(rows, reduction, mask, ws.shape[0], hs.dtype)


_SHAPE_DOC = """Shape:
        - student_hidden ``[N, Hs]``, student_weight ``[V, Hs]``, student_bias ``[V]``;
          teacher_hidden ``[N, Ht]``, teacher_weight ``[V, Ht]``, teacher_bias ``[V]`` (each side
          one of float16, bfloat16, float32, float64; the head GEMMs run in that dtype, the
          divergence in float32, float64 stays float64).
        - output: ``[]``, or ``[N]`` for ``reduction="none"``; the student's dtype.

    Memory O(N + V·H) beyond the inputs; FLOPs forward ``2·N·V·(Hs+Ht)``, backward the same
    recomputation plus ``2·N·V·H`` per input needing a gradient (module docstring)."""

_ARGS_DOC = """student_hidden: student hidden states ``[N, Hs]``.
        student_weight: student output head ``[V, Hs]`` (``torch.nn.Linear(Hs, V).weight``).
        teacher_hidden: teacher hidden states ``[N, Ht]`` (Ht may differ from Hs).
        teacher_weight: teacher output head ``[V, Ht]``; same V as the student.
        student_bias, teacher_bias: optional head biases ``[V]``.
        {temperature}
        reduction: ``"batchmean"`` (default: sum over the vocabulary, mean over the kept rows),
            ``"sum"``, ``"mean"`` (the sum divided by kept rows x V) or ``"none"`` (``[N]``).
        ignore_mask: optional bool or 0/1 tensor ``[N]``; True drops the row (zero loss and
            gradient); means are over the kept rows (count clamped at 1).
        backend: ``"auto" | "cuda" | "triton" | "torch"``; ``"torch"`` and ``"triton"`` are
            implemented (``"auto"`` picks Triton on a CUDA device, the PyTorch path on the CPU)."""


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 4.0,
    reduction: str = "batchmean",
    ignore_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Hinton KD on the logits of two output heads, never materialising the ``[N, V]`` logits.

    Exactly :func:`kd_kernels.kd_loss` of ``z_s = h_s W_sᵀ + b_s`` and ``z_t = h_t W_tᵀ + b_t``:

    .. math::
        \\ell_i = T^2 \\sum_v p_{iv} (\\log p_{iv} - \\log q_{iv}),\\quad
        p = \\mathrm{softmax}(z_t/T),\\ q = \\mathrm{softmax}(z_s/T)

    with ``dL/dz_s = T (q - p)`` per row, chained into ``grad h_s = G W_s``,
    ``grad W_s = Gᵀ h_s``, ``grad b_s = Σ_i G_i``.

    Args:
        {args}

    {shape}

    Example::

        >>> hs = torch.randn(16, 32, requires_grad=True)
        >>> head = torch.nn.Linear(32, 1000)
        >>> ht, wt = torch.randn(16, 64), torch.randn(1000, 64)
        >>> loss = kd_kernels.fused_linear_kd_loss(hs, head.weight, ht, wt, student_bias=head.bias, temperature=2.0)
        >>> loss.backward()
    """
    loss = "fused_linear_kd_loss"
    _validate(
        loss, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
        ignore_mask, temperature=temperature, reduction=reduction, backend=backend,
    )  # fmt: skip
    return _fused(
        loss, _ops.fused_linear_kd_fwd, student_hidden, student_weight, student_bias, teacher_hidden,
        teacher_weight, teacher_bias, (float(temperature),), reduction, ignore_mask, backend,
    )  # fmt: skip


def fused_linear_jsd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Generalized JSD(β) on the logits of two output heads, never materialising ``[N, V]`` logits.

    Exactly :func:`kd_kernels.jsd_loss` of ``z_s = h_s W_sᵀ + b_s`` and ``z_t = h_t W_tᵀ + b_t``:

    .. math::
        M = \\beta p + (1-\\beta) q,\\quad
        \\ell_i = \\beta\\,\\mathrm{KL}(p_i \\| M_i) + (1-\\beta)\\,\\mathrm{KL}(q_i \\| M_i)

    with ``p = softmax(z_t/T)``, ``q = softmax(z_s/T)``; β = 0 is the forward KL(p ‖ q) and β = 1
    the reverse KL(q ‖ p) (the TRL / Liger endpoint rule). No T² factor. The logit gradient G is
    chained into ``grad h_s = G W_s``, ``grad W_s = Gᵀ h_s``, ``grad b_s = Σ_i G_i``. Liger's
    ``LigerFusedLinearJSD`` computes the same loss (its ``jsd_beta`` is β).

    Args:
        beta: mixture weight of the teacher, 0 <= β <= 1 (default 0.5).
        {args}

    {shape}

    Example::

        >>> hs = torch.randn(16, 32, requires_grad=True)
        >>> ws = torch.randn(1000, 32, requires_grad=True)
        >>> ht, wt = torch.randn(16, 64), torch.randn(1000, 64)
        >>> loss = kd_kernels.fused_linear_jsd_loss(hs, ws, ht, wt, beta=0.5)
        >>> loss.backward()
    """
    loss = "fused_linear_jsd_loss"
    _validate(
        loss, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
        ignore_mask, beta=beta, temperature=temperature, reduction=reduction, backend=backend,
    )  # fmt: skip
    return _fused(
        loss, _ops.fused_linear_jsd_fwd, student_hidden, student_weight, student_bias, teacher_hidden,
        teacher_weight, teacher_bias, (float(beta), float(temperature)), reduction, ignore_mask, backend,
    )  # fmt: skip


for _fn, _t in (
    (fused_linear_kd_loss, "temperature: T > 0 (default 4)."),
    (fused_linear_jsd_loss, "temperature: T > 0 (default 1)."),
):
    if _fn.__doc__ is not None:  # None under ``python -OO``
        _fn.__doc__ = _fn.__doc__.replace("{args}", _ARGS_DOC.replace("{temperature}", _t)).replace(
            "{shape}", _SHAPE_DOC
        )
del _fn, _t


class _FusedLinearLoss(LossModule):
    """Forwards the four head tensors, the per-batch tensors and the current attributes."""

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        ignore_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._function(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, ignore_mask=ignore_mask, **self.arguments(),
        )  # fmt: skip


class FusedLinearKDLoss(_FusedLinearLoss, function=fused_linear_kd_loss, spec=_ARGS["fused_linear_kd_loss"]):
    """Module form of :func:`fused_linear_kd_loss`; ``forward(student_hidden, student_weight,
    teacher_hidden, teacher_weight, student_bias=None, teacher_bias=None, ignore_mask=None)``.

    Example::

        >>> crit = kd_kernels.FusedLinearKDLoss(temperature=2.0)
        >>> hs = torch.randn(16, 32, requires_grad=True)
        >>> head = torch.nn.Linear(32, 1000, bias=False)
        >>> loss = crit(hs, head.weight, torch.randn(16, 64), torch.randn(1000, 64))
        >>> loss.backward()
    """

    def __init__(self, *, temperature: float = 4.0, reduction: str = "batchmean", backend: str = "auto") -> None:
        super().__init__(temperature=temperature, reduction=reduction, backend=backend)


class FusedLinearJSDLoss(_FusedLinearLoss, function=fused_linear_jsd_loss, spec=_ARGS["fused_linear_jsd_loss"]):
    """Module form of :func:`fused_linear_jsd_loss`; ``forward(student_hidden, student_weight,
    teacher_hidden, teacher_weight, student_bias=None, teacher_bias=None, ignore_mask=None)``."""

    def __init__(
        self, *, beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean", backend: str = "auto"
    ) -> None:
        super().__init__(beta=beta, temperature=temperature, reduction=reduction, backend=backend)
