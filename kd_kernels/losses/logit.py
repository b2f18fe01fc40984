"""Logit distillation losses: Hinton KD, reverse KL, generalized JSD, TVD, DIST and GRKD.

Inputs are student and teacher logits of the same shape ``[N, C]`` (rows are samples or
flattened tokens). Each function validates its inputs once, resolves ``backend`` and calls
its custom op (``kd_kernels/ops/logit.py``); the PyTorch path (``torch_impl/logit.py``)
processes rows in chunks and never materialises more than a few ``chunk x C`` temporaries.

Common to every loss here: ``ignore_mask`` is an optional bool (or 0/1) ``[N]`` tensor,
True = DROP the row (padding, prompt tokens); means are taken over the kept rows. When every
row is dropped the count is clamped at 1, so the loss is 0 (not NaN) and so are the
gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kd_kernels._backend import resolve_backend
from kd_kernels._validate import (
    backend_choice,
    check_args,
    check_choice,
    check_mask,
    check_pair,
    check_tensor,
    choice,
    number,
    optional,
)
from kd_kernels.losses._module import LossModule
from kd_kernels.ops import logit as _logit_ops
from kd_kernels.ops import topk as _topk_ops
from kd_kernels.ops._define import call

__all__ = [
    "DISTLoss",
    "GRKDLoss",
    "JSDLoss",
    "KDLoss",
    "ReverseKLLoss",
    "TVDLoss",
    "TopKTeacher",
    "dist_loss",
    "grkd_loss",
    "jsd_loss",
    "kd_loss",
    "reverse_kl_loss",
    "tvd_loss",
]

# Built kernels per loss (resolve_backend's ``kernels``); add "cuda"/"triton" here when the
# matching entry is added to the op's backend table in kd_kernels/ops/logit.py.
_KERNELS = {
    name: ("torch",) for name in ("kd_loss", "reverse_kl_loss", "jsd_loss", "tvd_loss", "dist_loss", "grkd_loss")
}
_KERNELS["kd_loss"] = ("torch", "cuda", "triton")  # csrc/cuda/logit.cu, kd_kernels/triton/logit.py
_KERNELS["reverse_kl_loss"] = ("torch", "cuda", "triton")  # csrc/cuda/logit.cu, kd_kernels/triton/logit.py
_KERNELS["tvd_loss"] = ("torch", "cuda", "triton")  # csrc/cuda/logit.cu, kd_kernels/triton/logit.py
_KERNELS["jsd_loss"] = ("torch", "cuda", "triton")  # csrc/cuda/logit.cu, kd_kernels/triton/logit.py
_KERNELS["dist_loss"] = ("torch", "triton")  # kd_kernels/triton/logit.py
_KERNELS["grkd_loss"] = ("torch", "triton")  # kd_kernels/triton/logit.py
REDUCTIONS = ("batchmean", "sum", "mean", "none")
_NAMES = ("student_logits", "teacher_logits")

# The non-tensor keyword arguments of each loss and their checks (shared with the modules).
_TEMPERATURE = number(positive=True)
_DIVERGENCE_ARGS = {"temperature": _TEMPERATURE, "reduction": choice(*REDUCTIONS), "backend": backend_choice}
_ARGS = {
    "kd_loss": _DIVERGENCE_ARGS,
    "reverse_kl_loss": _DIVERGENCE_ARGS,
    "tvd_loss": _DIVERGENCE_ARGS,
    "jsd_loss": {"beta": number(lo=0.0, hi=1.0), **_DIVERGENCE_ARGS},
    "dist_loss": {
        "temperature": _TEMPERATURE,
        "inter_weight": number(nonneg=True),
        "intra_weight": number(nonneg=True),
        "backend": backend_choice,
    },
    "grkd_loss": {
        "temperature": _TEMPERATURE,
        "top_k": optional(number(integer=True, lo=1)),
        "backend": backend_choice,
    },
}


def _validate(loss, student, teacher, ignore_mask, **args):
    """Tensors, then every keyword argument of ``loss`` (``None`` is never a default stand-in)."""
    check_pair(loss, student, teacher, names=_NAMES, ranks=(2,), min_rows=1, same_last_dim=True)
    check_args(loss, _ARGS[loss], **args)
    check_mask(loss, "ignore_mask", ignore_mask, (student.shape[0],), student.device)


def _as_bool(ignore_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if ignore_mask is None else ignore_mask.to(torch.bool)


def _reduce(rows: torch.Tensor, reduction: str, ignore_mask: torch.Tensor | None, num_classes: int, dtype):
    """Per-row losses [N] (0 on dropped rows) -> the requested reduction, in ``dtype``."""
    if reduction == "none":
        return rows.to(dtype)
    total = rows.sum()
    if reduction == "sum":
        return total.to(dtype)
    kept = rows.shape[0] if ignore_mask is None else (~ignore_mask).sum().clamp_min(1)
    if reduction == "batchmean":
        return (total / kept).to(dtype)
    return (total / (kept * num_classes)).to(dtype)  # "mean", as torch's kl_div "mean"


def _divergence(loss: str, op, student, teacher, scalars, reduction, ignore_mask, backend):
    backend = resolve_backend(backend, student.device, loss=loss, kernels=_KERNELS[loss])
    mask = _as_bool(ignore_mask)
    rows, _, _ = call(op, student, teacher, *scalars, mask, backend)
    return _reduce(rows, reduction, mask, student.shape[1], student.dtype)


class TopKTeacher(NamedTuple):
    """An offline teacher stored as its top-k log-probabilities (what vLLM / SGLang return).

    Pass it as ``teacher_logits`` to :func:`kd_loss`, :func:`reverse_kl_loss`, :func:`jsd_loss`
    or :func:`tvd_loss` instead of dense ``[N, V]`` teacher logits (``V =
    student_logits.shape[1]``).

    Fields:
        indices: ``[N, k]`` int64 class ids, ``1 <= k <= V``, distinct within a row and in
            ``[0, V)`` (not checked: that would read tensor values; duplicates count twice).
        logprobs: ``[N, k]`` floating (any of float16, bfloat16, float32, float64) teacher
            log-probabilities of those classes. They are the teacher's FINAL (already tempered)
            distribution: ``temperature`` is applied to the student only and never re-applied
            to them. ``-inf`` means probability 0. The teacher gets no gradient.
        missing: how the mass outside the k classes is treated:

            - ``"renormalize"`` (default): ``p_c = exp(lp_c) / sum_j exp(lp_j)`` on the k
              classes and 0 elsewhere; the divergence is the dense one against that teacher
              over the V classes (so reverse KL is +inf unless the student also has no mass
              outside the k; JSD and TVD count the student's outside mass
              ``q_rest = 1 - sum_k q_c``).
            - ``"rest"``: ``p_c = exp(lp_c)`` as given (assumed to sum to <= 1) plus one "rest"
              bucket of mass ``p_rest = max(0, 1 - sum_k p_c)``, compared with the student's
              ``q_rest = 1 - sum_k q_c``: the divergence is computed over the k + 1 buckets.

    Each row needs at least one finite log-probability in "renormalize" mode (or be dropped by
    ``ignore_mask``). Memory: O(N k) besides the student's ``[N, V]`` gradient. Backends
    ``"torch"`` and ``"triton"`` (``kd_kernels/triton/topk.py``; no CUDA C++ kernel).

    Example::

        >>> s = torch.randn(8, 1000, requires_grad=True)
        >>> lp, idx = torch.randn(8, 1000).log_softmax(1).topk(20, dim=1)
        >>> loss = kd_kernels.kd_loss(s, kd_kernels.TopKTeacher(idx, lp), temperature=1.0)
        >>> loss.backward()
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    missing: str = "renormalize"


_MISSING = ("renormalize", "rest")
_TOPK_KERNELS = ("torch", "triton")  # the backends of kd_kernels/ops/topk.py (triton: kd_kernels/triton/topk.py)


def _validate_topk(loss: str, student, teacher: TopKTeacher, ignore_mask) -> None:
    """Shapes, dtypes and devices of a top-k teacher (never tensor values: safe under torch.compile)."""
    check_tensor(loss, "student_logits", student, "[N, V]")
    if student.dim() != 2:
        raise ValueError(f"{loss}: student_logits must have shape [N, V], got {tuple(student.shape)}")
    if student.shape[0] < 1 or student.shape[1] < 1:
        raise ValueError(f"{loss}: student_logits must have N >= 1 rows and V >= 1 classes, got {tuple(student.shape)}")
    idx, lp = teacher.indices, teacher.logprobs
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
        what = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"{loss}: teacher_logits.indices must be an int64 tensor [N, k], got {what}")
    check_tensor(loss, "teacher_logits.logprobs", lp, "[N, k]")
    if idx.dim() != 2 or idx.shape[0] != student.shape[0]:
        raise ValueError(
            f"{loss}: teacher_logits.indices must have shape [N, k] with N = student_logits.shape[0] "
            f"({student.shape[0]}), got {tuple(idx.shape)}"
        )
    if not 1 <= idx.shape[1] <= student.shape[1]:
        raise ValueError(
            f"{loss}: teacher_logits.indices must have 1 <= k <= V = {student.shape[1]} columns, got {idx.shape[1]}"
        )
    if tuple(lp.shape) != tuple(idx.shape):
        raise ValueError(
            f"{loss}: teacher_logits.logprobs must have the shape of indices {tuple(idx.shape)}, got {tuple(lp.shape)}"
        )
    for name, t in (("indices", idx), ("logprobs", lp)):
        if t.device != student.device:
            raise ValueError(
                f"{loss}: teacher_logits.{name} is on {t.device} but student_logits is on {student.device}; "
                "put both on one device"
            )
    check_choice(loss, "teacher_logits.missing", teacher.missing, _MISSING)
    check_mask(loss, "ignore_mask", ignore_mask, (student.shape[0],), student.device)


def _topk_divergence(
    loss: str,
    kind: str,
    student: torch.Tensor,
    teacher: TopKTeacher,
    beta: float,
    temperature: float,
    reduction: str,
    ignore_mask: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """A divergence against a :class:`TopKTeacher` (kd_kernels/ops/topk.py)."""
    _validate_topk(loss, student, teacher, ignore_mask)
    backend = resolve_backend(backend, student.device, loss=loss, kernels=_TOPK_KERNELS)
    mask = _as_bool(ignore_mask)
    rows, _, _ = call(
        _topk_ops.topk_fwd,
        student,
        teacher.indices.contiguous(),
        teacher.logprobs.contiguous(),
        kind,
        teacher.missing == "rest",
        float(beta),
        float(temperature),
        mask,
        backend,
    )
    return _reduce(rows, reduction, mask, student.shape[1], student.dtype)


_REDUCTION_DOC = """reduction: ``"batchmean"`` (default: sum over classes, mean over the kept rows),
            ``"sum"`` (sum over kept rows and classes), ``"mean"`` (the sum divided by
            kept rows x C, as ``torch.nn.functional.kl_div(reduction="mean")``) or
            ``"none"`` (the per-row losses ``[N]``, 0 for dropped rows)."""

_COMMON_ARGS_DOC = """ignore_mask: optional bool or 0/1 tensor ``[N]``; True drops the row (it gets
            zero loss and zero gradient) and means are over the kept rows (count clamped
            at 1: all rows dropped gives 0).
        backend: ``"auto" | "cuda" | "triton" | "torch"``."""

_SHAPE_DOC = """Shape:
        - student_logits, teacher_logits: ``[N, C]`` (any of float16, bfloat16, float32,
          float64; computed in float32, float64 stays float64).
        - output: ``[]``, or ``[N]`` for ``reduction="none"``; the student's dtype."""


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 4.0,
    reduction: str = "batchmean",
    ignore_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Hinton knowledge distillation: temperature-scaled forward KL.

    .. math::
        \\ell_i = T^2 \\sum_c p_{ic} (\\log p_{ic} - \\log q_{ic}),\\quad
        p = \\mathrm{softmax}(z_t/T),\\ q = \\mathrm{softmax}(z_s/T)

    The gradient is ``T (q - p)`` per row; the T² keeps its size comparable across T.

    Args:
        student_logits: student logits ``[N, C]``.
        teacher_logits: teacher logits ``[N, C]``; it gets a gradient only if it requires one. Or a
            :class:`TopKTeacher` (stored top-k log-probabilities; its docstring gives the semantics).
        temperature: T > 0 (default 4, as RepDistiller / mdistiller on CIFAR-100).
        {reduction}
        {common}

    With ``reduction="none"`` each row includes the T² factor.

    {shape}

    Paper: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015).
    Matches RepDistiller ``DistillKL`` (``kl_div(log q, p, sum) * T² / N``) and mdistiller
    ``kd_loss`` with the default ``"batchmean"``. Liger, TRL and DistiLLM use no T².

    Example::

        >>> s = torch.randn(8, 100, requires_grad=True)
        >>> t = torch.randn(8, 100)
        >>> loss = kd_kernels.kd_loss(s, t, temperature=4.0)
        >>> loss.backward()
    """
    if isinstance(teacher_logits, TopKTeacher):
        check_args("kd_loss", _ARGS["kd_loss"], temperature=temperature, reduction=reduction, backend=backend)
        return _topk_divergence(
            "kd_loss", "kd", student_logits, teacher_logits, 0.0, temperature, reduction, ignore_mask, backend
        )
    _validate(
        "kd_loss", student_logits, teacher_logits, ignore_mask, temperature=temperature, reduction=reduction,
        backend=backend,
    )
    return _divergence(
        "kd_loss",
        _logit_ops.kd_fwd,
        student_logits,
        teacher_logits,
        (float(temperature),),
        reduction,
        ignore_mask,
        backend,
    )


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Reverse KL divergence KL(q ‖ p) between student and teacher distributions.

    .. math::
        \\ell_i = \\sum_c q_{ic} (\\log q_{ic} - \\log p_{ic}),\\quad
        p = \\mathrm{softmax}(z_t/T),\\ q = \\mathrm{softmax}(z_s/T)

    No T² factor (as DistiLLM / TRL / Liger).

    Args:
        student_logits: student logits ``[N, C]``.
        teacher_logits: teacher logits ``[N, C]``; it gets a gradient only if it requires one. Or a
            :class:`TopKTeacher` (stored top-k log-probabilities; its docstring gives the semantics).
        temperature: T > 0 (default 1).
        {reduction}
        {common}

    {shape}

    Paper: mode-seeking reverse KL for LLM distillation (MiniLLM, Gu et al. 2024; DistiLLM,
    Ko et al. 2024). Matches DistiLLM ``reverse_kl`` (mean over valid tokens = ``"batchmean"``
    with ``ignore_mask`` = the label-ignored positions).

    Example::

        >>> s = torch.randn(8, 100, requires_grad=True)
        >>> t = torch.randn(8, 100)
        >>> loss = kd_kernels.reverse_kl_loss(s, t)
        >>> loss.backward()
    """
    if isinstance(teacher_logits, TopKTeacher):
        check_args(
            "reverse_kl_loss", _ARGS["reverse_kl_loss"], temperature=temperature, reduction=reduction, backend=backend
        )
        return _topk_divergence(
            "reverse_kl_loss",
            "reverse_kl",
            student_logits,
            teacher_logits,
            0.0,
            temperature,
            reduction,
            ignore_mask,
            backend,
        )
    _validate(
        "reverse_kl_loss", student_logits, teacher_logits, ignore_mask, temperature=temperature,
        reduction=reduction, backend=backend,
    )
    return _divergence(
        "reverse_kl_loss",
        _logit_ops.reverse_kl_fwd,
        student_logits,
        teacher_logits,
        (float(temperature),),
        reduction,
        ignore_mask,
        backend,
    )


def jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence JSD(β) with the TRL / Liger endpoint rule.

    .. math::
        M = \\beta p + (1-\\beta) q,\\quad
        \\ell_i = \\beta\\,\\mathrm{KL}(p_i \\| M_i) + (1-\\beta)\\,\\mathrm{KL}(q_i \\| M_i)

    with ``p = softmax(z_t/T)``, ``q = softmax(z_s/T)``, for 0 < β < 1. The endpoints are
    special-cased exactly as in TRL and Liger (and so are discontinuous): β = 0 gives the
    forward KL(p ‖ q), β = 1 the reverse KL(q ‖ p). No T² factor.

    Args:
        student_logits: student logits ``[N, C]``.
        teacher_logits: teacher logits ``[N, C]``; it gets a gradient only if it requires one. Or a
            :class:`TopKTeacher` (stored top-k log-probabilities; its docstring gives the semantics).
        beta: mixture weight of the teacher, 0 <= β <= 1 (default 0.5). DistiLLM's
            ``js_distance(lam)`` is β = 1 - lam.
        temperature: T > 0 (default 1).
        {reduction}
        {common}

    {shape}

    Paper: Agarwal et al., "On-Policy Distillation of Language Models" (GKD, ICLR 2024).
    Matches TRL ``GKDTrainer.generalized_jsd_loss`` and Liger ``LigerJSD`` (batchmean =
    sum / valid rows).

    Example::

        >>> s = torch.randn(8, 100, requires_grad=True)
        >>> t = torch.randn(8, 100)
        >>> loss = kd_kernels.jsd_loss(s, t, beta=0.5)
        >>> loss.backward()
    """
    if isinstance(teacher_logits, TopKTeacher):
        check_args(
            "jsd_loss", _ARGS["jsd_loss"], beta=beta, temperature=temperature, reduction=reduction, backend=backend
        )
        return _topk_divergence(
            "jsd_loss", "jsd", student_logits, teacher_logits, beta, temperature, reduction, ignore_mask, backend
        )
    _validate(
        "jsd_loss", student_logits, teacher_logits, ignore_mask, beta=beta, temperature=temperature,
        reduction=reduction, backend=backend,
    )
    return _divergence(
        "jsd_loss",
        _logit_ops.jsd_fwd,
        student_logits,
        teacher_logits,
        (float(beta), float(temperature)),
        reduction,
        ignore_mask,
        backend,
    )


def tvd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Total variation distance between student and teacher distributions.

    .. math::
        \\ell_i = \\tfrac12 \\sum_c |p_{ic} - q_{ic}|,\\quad
        p = \\mathrm{softmax}(z_t/T),\\ q = \\mathrm{softmax}(z_s/T)

    The gradient uses the subgradient sign(0) = 0 at ties, as ``torch.abs``.

    Args:
        student_logits: student logits ``[N, C]``.
        teacher_logits: teacher logits ``[N, C]``; it gets a gradient only if it requires one. Or a
            :class:`TopKTeacher` (stored top-k log-probabilities; its docstring gives the semantics).
        temperature: T > 0 (default 1).
        {reduction}
        {common}

    {shape}

    Matches Liger ``LigerTVDLoss`` applied to ``softmax(z/T)`` (batchmean over non-ignored
    rows), except that both inputs get their true gradient here.

    Example::

        >>> s = torch.randn(8, 100, requires_grad=True)
        >>> t = torch.randn(8, 100)
        >>> loss = kd_kernels.tvd_loss(s, t)
        >>> loss.backward()
    """
    if isinstance(teacher_logits, TopKTeacher):
        check_args("tvd_loss", _ARGS["tvd_loss"], temperature=temperature, reduction=reduction, backend=backend)
        return _topk_divergence(
            "tvd_loss", "tvd", student_logits, teacher_logits, 0.0, temperature, reduction, ignore_mask, backend
        )
    _validate(
        "tvd_loss", student_logits, teacher_logits, ignore_mask, temperature=temperature, reduction=reduction,
        backend=backend,
    )
    return _divergence(
        "tvd_loss",
        _logit_ops.tvd_fwd,
        student_logits,
        teacher_logits,
        (float(temperature),),
        reduction,
        ignore_mask,
        backend,
    )


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
    ignore_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """DIST: Pearson-correlation relations between student and teacher predictions.

    .. math::
        L = \\tau^2 \\big(\\beta (1 - \\tfrac1K \\sum_i r(y_{s,i:}, y_{t,i:}))
            + \\gamma (1 - \\tfrac1C \\sum_c r(y_{s,:c}, y_{t,:c}))\\big)

    with ``y = softmax(z/τ)``, ``r(a, b) = <a-ā, b-b̄> / (|a-ā| |b-b̄| + 1e-8)``, β =
    ``inter_weight`` (per-sample relation across classes), γ = ``intra_weight`` (per-class
    relation across the K kept rows).

    Args:
        student_logits: student logits ``[N, C]``.
        teacher_logits: teacher logits ``[N, C]``; it gets a gradient only if it requires one.
        temperature: τ > 0 (default 1, ImageNet; CIFAR uses 4).
        inter_weight: β >= 0 (default 1).
        intra_weight: γ >= 0 (default 1).
        {common}

    Shape:
        - student_logits, teacher_logits: ``[N, C]``.
        - output: ``[]`` in the student's dtype (no ``reduction``: the intra term couples
          all rows). With ``ignore_mask`` both the inter mean and the per-class statistics
          of the intra term use only the kept rows; with a single kept row the intra
          correlation is 0 (as in the reference).

    Paper: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022).
    Matches hunto/image_classification_sota ``DIST`` (eps 1e-8, τ² factor); its training
    configs multiply the loss by 2.

    Example::

        >>> s = torch.randn(8, 100, requires_grad=True)
        >>> t = torch.randn(8, 100)
        >>> loss = kd_kernels.dist_loss(s, t)
        >>> loss.backward()
    """
    _validate(
        "dist_loss", student_logits, teacher_logits, ignore_mask, temperature=temperature,
        inter_weight=inter_weight, intra_weight=intra_weight, backend=backend,
    )
    backend = resolve_backend(backend, student_logits.device, loss="dist_loss", kernels=_KERNELS["dist_loss"])
    loss, _, _, _ = call(
        _logit_ops.dist_fwd,
        student_logits,
        teacher_logits,
        float(temperature),
        float(inter_weight),
        float(intra_weight),
        _as_bool(ignore_mask),
        backend,
    )
    return loss.to(student_logits.dtype)


def grkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    ignore_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """GRKD: group relative (pairwise-ranking) distillation over teacher-ordered class pairs.

    .. math::
        \\ell_i = \\frac{1}{|P_i|} \\sum_{(a,b) \\in P_i}
            \\mathrm{softplus}\\big(-(z_{s,ia} - z_{s,ib})/\\tau\\big),\\quad
        P_i = \\{(a, b) : z_{t,ia} > z_{t,ib}\\},\\quad L = \\tfrac1K \\sum_i \\ell_i

    Ties in the teacher are excluded; with ``top_k`` only pairs whose first class ``a`` is
    among the row's ``top_k`` largest teacher logits (``torch.topk``) count; a row without
    pairs contributes 0 (it still counts in the mean over rows).

    Args:
        student_logits: student logits ``[N, C]``.
        teacher_logits: teacher logits ``[N, C]``. The loss is piecewise constant in them,
            so the teacher gets no gradient (its ``.grad`` stays None, as in the reference).
        temperature: τ > 0 (default 1), scales the student logit gaps.
        top_k: None (all pairs, O(C²) per row) or an int >= 1; values >= C mean all classes.
        {common}

    Shape:
        - student_logits, teacher_logits: ``[N, C]``.
        - output: ``[]`` in the student's dtype (mean over kept rows; no ``reduction``).

    Paper: Li, Zhou, Chen, "Group Relative Knowledge Distillation" (arXiv 2504.20482). No
    public code exists; this is the pairwise logistic form of docs/logit.md §9, with a mean
    over pairs and rows.

    Example::

        >>> s = torch.randn(8, 100, requires_grad=True)
        >>> t = torch.randn(8, 100)
        >>> loss = kd_kernels.grkd_loss(s, t, top_k=10)
        >>> loss.backward()
    """
    _validate(
        "grkd_loss", student_logits, teacher_logits, ignore_mask, temperature=temperature, top_k=top_k,
        backend=backend,
    )
    backend = resolve_backend(backend, student_logits.device, loss="grkd_loss", kernels=_KERNELS["grkd_loss"])
    loss, _ = call(
        _logit_ops.grkd_fwd,
        student_logits, teacher_logits, float(temperature), top_k, _as_bool(ignore_mask), backend
    )
    return loss.to(student_logits.dtype)


for _fn in (kd_loss, reverse_kl_loss, jsd_loss, tvd_loss, dist_loss, grkd_loss):
    if _fn.__doc__ is not None:  # None under ``python -OO``
        _fn.__doc__ = (
            _fn.__doc__.replace("{reduction}", _REDUCTION_DOC)
            .replace("{common}", _COMMON_ARGS_DOC)
            .replace("{shape}", _SHAPE_DOC)
        )
del _fn


class _LogitLoss(LossModule):
    """Forwards ``(student_logits, teacher_logits, ignore_mask)`` and the current attributes."""

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, ignore_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._function(student_logits, teacher_logits, ignore_mask=ignore_mask, **self.arguments())

    @property
    def kwargs(self) -> dict:
        """The current keyword arguments (read-only view; assign the attributes to change them)."""
        return self.arguments()


class KDLoss(_LogitLoss, function=kd_loss, spec=_ARGS["kd_loss"]):
    """Module form of :func:`kd_loss` (Hinton KD); ``forward(student_logits, teacher_logits, ignore_mask=None)``.

    Example::

        >>> crit = kd_kernels.KDLoss(temperature=4.0)
        >>> s = torch.randn(8, 100, requires_grad=True)
        >>> loss = crit(s, torch.randn(8, 100))
        >>> crit.temperature = 2.0  # e.g. a temperature schedule: used from the next call on
        >>> loss = loss + crit(s, torch.randn(8, 100))
        >>> loss.backward()
    """

    def __init__(self, *, temperature: float = 4.0, reduction: str = "batchmean", backend: str = "auto") -> None:
        super().__init__(temperature=temperature, reduction=reduction, backend=backend)


class ReverseKLLoss(_LogitLoss, function=reverse_kl_loss, spec=_ARGS["reverse_kl_loss"]):
    """Module form of :func:`reverse_kl_loss`; ``forward(student_logits, teacher_logits, ignore_mask=None)``."""

    def __init__(self, *, temperature: float = 1.0, reduction: str = "batchmean", backend: str = "auto") -> None:
        super().__init__(temperature=temperature, reduction=reduction, backend=backend)


class JSDLoss(_LogitLoss, function=jsd_loss, spec=_ARGS["jsd_loss"]):
    """Module form of :func:`jsd_loss` (JSD(β)); ``forward(student_logits, teacher_logits, ignore_mask=None)``."""

    def __init__(
        self, *, beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean", backend: str = "auto"
    ) -> None:
        super().__init__(beta=beta, temperature=temperature, reduction=reduction, backend=backend)


class TVDLoss(_LogitLoss, function=tvd_loss, spec=_ARGS["tvd_loss"]):
    """Module form of :func:`tvd_loss`; ``forward(student_logits, teacher_logits, ignore_mask=None)``."""

    def __init__(self, *, temperature: float = 1.0, reduction: str = "batchmean", backend: str = "auto") -> None:
        super().__init__(temperature=temperature, reduction=reduction, backend=backend)


class DISTLoss(_LogitLoss, function=dist_loss, spec=_ARGS["dist_loss"]):
    """Module form of :func:`dist_loss`; ``forward(student_logits, teacher_logits, ignore_mask=None)``."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        inter_weight: float = 1.0,
        intra_weight: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(temperature=temperature, inter_weight=inter_weight, intra_weight=intra_weight, backend=backend)


class GRKDLoss(_LogitLoss, function=grkd_loss, spec=_ARGS["grkd_loss"]):
    """Module form of :func:`grkd_loss`; ``forward(student_logits, teacher_logits, ignore_mask=None)``."""

    def __init__(self, *, temperature: float = 1.0, top_k: int | None = None, backend: str = "auto") -> None:
        super().__init__(temperature=temperature, top_k=top_k, backend=backend)
