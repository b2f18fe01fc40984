"""RKD: Relational Knowledge Distillation (Park, Kim, Lu, Cho, CVPR 2019), distance and
angle losses. Public functions and modules; the math is in docs/rkd.md and in
``kd_kernels/torch_impl/rkd.py``."""

from __future__ import annotations

import torch

from kd_kernels._backend import resolve_backend
from kd_kernels._validate import backend_choice, check_args, check_pair, choice, number
from kd_kernels.losses._module import LossModule
from kd_kernels.ops import rkd as _ops
from kd_kernels.ops._define import call

__all__ = ["RKDAngleLoss", "RKDDistanceLoss", "RKDLoss", "rkd_angle_loss", "rkd_distance_loss", "rkd_loss"]

_BACKENDS = ("torch", "triton", "cuda")  # auto on CUDA: cuda, then triton (GPU ranking not yet measured)
# rkd_loss runs the two others' kernels (no kernel of its own).
_KERNELS = {"rkd_distance_loss": _BACKENDS, "rkd_angle_loss": _BACKENDS, "rkd_loss": _BACKENDS}
_REDUCTIONS = ("mean", "sum", "none")
# The non-tensor keyword arguments of each loss and their checks (shared with the modules).
_PAIR_ARGS = {"reduction": choice(*_REDUCTIONS), "backend": backend_choice}
_RKD_ARGS = {"distance_weight": number(nonneg=True), "angle_weight": number(nonneg=True), "backend": backend_choice}


def _prepare(loss: str, student, teacher, reduction: str, backend: str, min_rows: int) -> str:
    check_pair(loss, student, teacher, min_rows=min_rows)
    check_args(loss, _PAIR_ARGS, reduction=reduction, backend=backend)
    return resolve_backend(backend, student.device, loss=loss, kernels=_BACKENDS)


def rkd_distance_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "mean", backend: str = "auto"
) -> torch.Tensor:
    r"""RKD distance loss: smooth-L1 between the normalized pairwise-distance matrices.

    .. math::
        d_{ij} = \lVert x_i - x_j \rVert,\quad \mu = \tfrac{1}{N(N-1)}\sum_{i \ne j} d_{ij},\quad
        \hat d = d / \mu_s,\ \hat t = t / \mu_t,\qquad
        L = \tfrac{1}{N^2} \sum_{i, j} \operatorname{smoothL1}(\hat d_{ij} - \hat t_{ij})

    with smoothL1(x) = 0.5 x² if |x| < 1 else |x| - 0.5, squared distances clamped at 1e-12
    (identical rows have distance 1e-6 and no gradient) and d_ii = 0. The normalizer μ_s is
    part of the graph (it receives a gradient), as in the reference code.

    Args:
        student: student features ``[N, Ds]`` (N >= 2).
        teacher: teacher features ``[N, Dt]``; Dt may differ from Ds. Gets its true gradient
            only if it requires grad.
        reduction: ``"mean"`` (over all N² entries, diagonal included), ``"sum"`` or
            ``"none"`` (the ``[N, N]`` per-pair terms; note this materializes N x N).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Shape:
        student ``[N, Ds]``, teacher ``[N, Dt]`` -> 0-dim, or ``[N, N]`` for ``"none"``; the
        result has the student's dtype.

    Matches lenscloth/RKD ``RkdDistance`` (also HobbitLong/RepDistiller, mdistiller): mean
    over all N² entries, distances divided by their mean over i != j. Memory: O(N·D) plus
    row blocks of the distance matrix (no N x N buffer except for ``"none"``).

    Example::

        >>> s = torch.randn(64, 128, requires_grad=True)
        >>> t = torch.randn(64, 256)
        >>> loss = kd_kernels.rkd_distance_loss(s, t)
        >>> loss.backward()
    """
    backend = _prepare("rkd_distance_loss", student, teacher, reduction, backend, 2)
    return call(_ops.rkd_distance_fwd, student, teacher, reduction, backend)[0]


def rkd_angle_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "mean", backend: str = "auto"
) -> torch.Tensor:
    r"""RKD angle loss: smooth-L1 between the cosines of all N³ triplet angles.

    .. math::
        \psi_{abc} = \Big\langle \frac{x_b - x_a}{\lVert x_b - x_a \rVert},
                              \frac{x_c - x_a}{\lVert x_c - x_a \rVert} \Big\rangle,\qquad
        L = \tfrac{1}{N^3} \sum_{a, b, c} \operatorname{smoothL1}(\psi^s_{abc} - \psi^t_{abc})

    (the angle at vertex a). Degenerate triples (b or c equal to a, or a row identical to
    row a) have ψ = 0, contribute nothing, and are counted in the N³ denominator, as the
    reference's F.normalize (eps 1e-12) of a zero vector gives. The torch and Triton paths
    compute ψ from centred Gram products: two rows whose squared difference is below the
    rounding of their squared norms (8 ulp) count as identical, and ψ is clamped to [-1, 1]
    (no gradient through either), where the reference's own fp32 result is rounding noise.

    Args:
        student: student features ``[N, Ds]`` (N >= 1; N = 1, 2 give only degenerate
            triples and loss 0).
        teacher: teacher features ``[N, Dt]``; Dt may differ from Ds. Gets its true gradient
            only if it requires grad.
        reduction: ``"mean"`` (over all N³ triples), ``"sum"`` (over all N³ triples) or
            ``"none"`` (``[N]``: per anchor a, the mean over its N² (b, c) pairs, so that
            ``mean == none.mean()``).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Shape:
        student ``[N, Ds]``, teacher ``[N, Dt]`` -> 0-dim, or ``[N]`` for ``"none"``; the
        result has the student's dtype.

    Matches lenscloth/RKD ``RKdAngle`` (also RepDistiller, mdistiller). Memory: O(N²)
    (Gram matrices and anchor chunks), instead of the reference's N x N x D and N³ tensors.

    Example::

        >>> s = torch.randn(64, 128, requires_grad=True)
        >>> t = torch.randn(64, 256)
        >>> loss = kd_kernels.rkd_angle_loss(s, t)
        >>> loss.backward()
    """
    backend = _prepare("rkd_angle_loss", student, teacher, reduction, backend, 1)
    return call(_ops.rkd_angle_fwd, student, teacher, reduction, backend)


def rkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    backend: str = "auto",
) -> torch.Tensor:
    r"""RKD loss: ``distance_weight * rkd_distance_loss + angle_weight * rkd_angle_loss``
    (both with ``reduction="mean"``).

    Args:
        student: student features ``[N, Ds]`` (N >= 2).
        teacher: teacher features ``[N, Dt]``.
        distance_weight: weight of the distance loss (>= 0; default 25).
        angle_weight: weight of the angle loss (>= 0; default 50).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Shape:
        student ``[N, Ds]``, teacher ``[N, Dt]`` -> 0-dim in the student's dtype.

    Defaults are the CIFAR-100 weights of HobbitLong/RepDistiller ``RKDLoss(w_d=25, w_a=50)``
    and mdistiller; the official metric-learning scripts of lenscloth/RKD use 1 and 2.

    Example::

        >>> s = torch.randn(64, 128, requires_grad=True)
        >>> t = torch.randn(64, 256)
        >>> loss = kd_kernels.rkd_loss(s, t)
        >>> loss.backward()
    """
    check_args("rkd_loss", _RKD_ARGS, distance_weight=distance_weight, angle_weight=angle_weight, backend=backend)
    backend = _prepare("rkd_loss", student, teacher, "mean", backend, 2)
    dist = call(_ops.rkd_distance_fwd, student, teacher, "mean", backend)[0]
    angle = call(_ops.rkd_angle_fwd, student, teacher, "mean", backend)
    return distance_weight * dist + angle_weight * angle


class RKDDistanceLoss(LossModule, function=rkd_distance_loss, spec=_PAIR_ARGS):
    """Module form of :func:`rkd_distance_loss`; ``forward(student, teacher)``."""

    def __init__(self, *, reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__(reduction=reduction, backend=backend)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return rkd_distance_loss(student, teacher, reduction=self.reduction, backend=self.backend)


class RKDAngleLoss(LossModule, function=rkd_angle_loss, spec=_PAIR_ARGS):
    """Module form of :func:`rkd_angle_loss`; ``forward(student, teacher)``."""

    def __init__(self, *, reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__(reduction=reduction, backend=backend)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return rkd_angle_loss(student, teacher, reduction=self.reduction, backend=self.backend)


class RKDLoss(LossModule, function=rkd_loss, spec=_RKD_ARGS):
    """Module form of :func:`rkd_loss`; ``forward(student, teacher)``."""

    def __init__(self, *, distance_weight: float = 25.0, angle_weight: float = 50.0, backend: str = "auto") -> None:
        super().__init__(distance_weight=distance_weight, angle_weight=angle_weight, backend=backend)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return rkd_loss(
            student, teacher, distance_weight=self.distance_weight, angle_weight=self.angle_weight, backend=self.backend
        )
