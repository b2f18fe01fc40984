"""Custom ops of the fused-linear KD / JSD losses, defined with
:func:`kd_kernels.ops._define.define_loss_op` (autograd, dispatch on the resolved ``backend``,
float64 routing, the double-backward error). Math: :mod:`kd_kernels.torch_impl.fused_linear`.

Ops (``kd_kernels`` namespace; ``backend`` already resolved; a bias is ``[V]`` or an empty
tensor for none):

- ``fused_linear_kd_fwd(student_hidden [N, Hs], student_weight [V, Hs], student_bias,
  teacher_hidden [N, Ht], teacher_weight [V, Ht], teacher_bias, temperature, ignore_mask, backend)``
  and ``fused_linear_jsd_fwd(..., beta, temperature, ignore_mask, backend)``
  -> ``(row_loss [N], lse_s [N], lse_t [N])``: the rows of ``kd`` / ``jsd`` on the logits
  ``h Wᵀ + b`` (float32, float64 for float64 inputs; 0 on ignored rows; kd's include T²).
- ``fused_linear_<loss>_bwd(grad_row, <the six tensors>, lse_s, lse_t, <floats>, ignore_mask,
  need_<each of the six>, backend)`` -> the six gradients (empty where not needed).

Backends: ``"torch"`` and ``"triton"`` (``kd_kernels/triton/fused_linear.py``: logit tiles on
tensor cores, online log-sum-exp, chunked backward GEMMs; fp32 / fp16 / bf16, float64 runs the
torch kernel).
"""

from __future__ import annotations

import torch

from kd_kernels.ops._define import define_loss_op, lazy
from kd_kernels.torch_impl import fused_linear as _impl
from kd_kernels.torch_impl.logit import compute_dtype

__all__: list[str] = []

_TENSORS = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")


def _torch_kernels(kind: str, scalars: tuple[str, ...]):
    """``(forward, backward)`` of the "torch" backend with the op's argument order (minus backend)."""
    n = len(scalars)

    def temperature_beta(values) -> tuple[float, float]:
        named = dict(zip(scalars, values, strict=True))
        return float(named["temperature"]), float(named.get("beta", 0.0))

    def forward(*args):
        tensors, values, ignore_mask = args[:6], args[6 : 6 + n], args[6 + n]
        temperature, beta = temperature_beta(values)
        return _impl.fused_linear_fwd(kind, *tensors, temperature, beta, ignore_mask)

    def backward(grad_row, *args):
        tensors, (lse_s, lse_t) = args[:6], args[6:8]
        values, ignore_mask, needs = args[8 : 8 + n], args[8 + n], args[9 + n : 15 + n]
        temperature, beta = temperature_beta(values)
        return _impl.fused_linear_bwd(
            kind, grad_row, *tensors, lse_s, lse_t, temperature, beta, ignore_mask, tuple(needs)
        )

    forward.__name__, backward.__name__ = f"_fused_linear_{kind}_fwd_torch", f"_fused_linear_{kind}_bwd_torch"
    return forward, backward


_TRITON = "kd_kernels.triton.fused_linear"  # launchers with the torch kernels' argument order

# loss -> backend -> (forward, backward).
_KERNELS: dict[str, dict] = {
    "kd": {
        "torch": _torch_kernels("kd", ("temperature",)),
        "triton": (lazy(_TRITON, "fused_linear_kd_fwd_triton"), lazy(_TRITON, "fused_linear_kd_bwd_triton")),
    },
    "jsd": {
        "torch": _torch_kernels("jsd", ("beta", "temperature")),
        "triton": (lazy(_TRITON, "fused_linear_jsd_fwd_triton"), lazy(_TRITON, "fused_linear_jsd_bwd_triton")),
    },
}


def _rows_fake(student_hidden, student_weight, student_bias, teacher_hidden, *_):
    rows = student_hidden.new_empty((student_hidden.shape[0],), dtype=compute_dtype(student_hidden, teacher_hidden))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


def _define(kind: str, scalars: tuple[str, ...]):
    """``kd_kernels::fused_linear_<kind>_fwd`` / ``_bwd`` with the float arguments ``scalars``."""
    sc = "".join(f"float {name}, " for name in scalars)
    tensors = "".join(f"Tensor {name}, " for name in _TENSORS)
    needs = "".join(f"bool need_{name}, " for name in _TENSORS)
    grads = ", ".join(f"Tensor grad_{name}" for name in _TENSORS)
    return define_loss_op(
        f"fused_linear_{kind}",
        fwd_schema=f"({tensors}{sc}Tensor? ignore_mask, str backend) -> (Tensor row_loss, Tensor lse_s, Tensor lse_t)",
        bwd_schema=(
            f"(Tensor grad_row, {tensors}Tensor lse_s, Tensor lse_t, {sc}Tensor? ignore_mask, {needs}str backend) "
            f"-> ({grads})"
        ),
        fake_fwd=_rows_fake,
        kernels=_KERNELS[kind],
    )


fused_linear_kd_fwd, fused_linear_kd_bwd = _define("kd", ("temperature",))
fused_linear_jsd_fwd, fused_linear_jsd_bwd = _define("jsd", ("beta", "temperature"))
