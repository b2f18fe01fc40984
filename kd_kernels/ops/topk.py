"""Custom op of the divergences with an offline top-k teacher (math: docs/logit.md, "Top-k
teachers"; kernels: kd_kernels/torch_impl/topk.py), defined with
:func:`kd_kernels.ops._define.define_loss_op`.

Ops (``kd_kernels`` namespace; ``backend`` is already resolved):

- ``topk_fwd(student [N, V], indices [N, k] int64, logprobs [N, k], str kind, bool rest, float beta,
  float temperature, Tensor? ignore_mask, str backend) -> (row_loss [N], lse_s [N], lse_out [N])``
- ``topk_bwd(grad_row, student, indices, logprobs, lse_s, lse_out, kind, rest, beta, temperature,
  ignore_mask, backend) -> grad_student [N, V]``

``kind`` is ``"kd" | "reverse_kl" | "jsd" | "tvd"`` (``beta`` is read for "jsd" only); ``rest`` is
True for ``missing="rest"``, False for ``"renormalize"``. ``row_loss`` / ``lse_*`` are float32
(float64 when the student or the log-probabilities are float64). Only the student gets a
gradient: the stored teacher is data.
"""

from __future__ import annotations

from kd_kernels.ops._define import define_loss_op, lazy
from kd_kernels.torch_impl import topk as _impl

__all__: list[str] = []

_TRITON = "kd_kernels.triton.topk"  # fp32 / fp16 / bf16 (float64 runs the torch kernels)
# backend -> (forward, backward)
_KERNELS: dict[str, tuple] = {
    "torch": (_impl.topk_fwd, _impl.topk_bwd),
    "triton": (lazy(_TRITON, "topk_fwd_triton"), lazy(_TRITON, "topk_bwd_triton")),
}


def _fake(student, indices, logprobs, kind, rest, beta, temperature, ignore_mask):
    dtype = _impl.compute_dtype(student, logprobs)
    return tuple(student.new_empty((student.shape[0],), dtype=dtype) for _ in range(3))


topk_fwd, topk_bwd = define_loss_op(
    "topk",
    fwd_schema=(
        "(Tensor student, Tensor indices, Tensor logprobs, str kind, bool rest, float beta, float temperature, "
        "Tensor? ignore_mask, str backend) -> (Tensor row_loss, Tensor lse_s, Tensor lse_out)"
    ),
    bwd_schema=(
        "(Tensor grad_row, Tensor student, Tensor indices, Tensor logprobs, Tensor lse_s, Tensor lse_out, "
        "str kind, bool rest, float beta, float temperature, Tensor? ignore_mask, str backend) "
        "-> (Tensor grad_student)"
    ),
    fake_fwd=_fake,
    kernels=_KERNELS,
)
