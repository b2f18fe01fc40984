"""Feature-geometry losses: Gram-Frobenius, Procrustes, linear CKA and relation (RDist).

All four compare the geometry of N paired rows of student features ``[N, Ds]`` and teacher
features ``[N, Dt]`` (samples, or flattened non-padding tokens); Ds may differ from Dt.
Batched inputs ``[B, N, Ds]``, ``[B, N, Dt]`` give one loss per item and the mean over B.
The math and the hand-written gradients are in kd_kernels/torch_impl/geometry.py and
docs/geometry.md. On the PyTorch path memory is O(D²) when N > max(Ds, Dt) (the D x D
form) and O(N²) otherwise, never both.

Masks: ``mask`` ``[N]`` (or ``[B, N]``) marks the rows to KEEP (bool or 0/1 integers); the
result equals the unmasked loss on the kept rows. Every item must keep at least as many rows
as the loss needs (N >= 2 with centring, N >= 4 for unbiased CKA, N >= 1 otherwise): in eager
mode a mask keeping fewer (e.g. all False) raises ValueError naming ``mask`` (this reads the
mask: one host sync for a CUDA mask); under ``torch.compile`` the check is skipped and such an
item gives NaN or the degenerate value the loss documents. Batched inputs need B >= 1.

Non-finite input: NaN or ±inf anywhere in ``student``/``teacher`` (masked-out rows included) gives a NaN loss
and NaN gradients; ``procrustes_loss`` then skips the SVD of that item (no LinAlgError).
"""

from __future__ import annotations

from torch import Tensor

from kd_kernels._backend import resolve_backend
from kd_kernels._validate import (
    backend_choice,
    check_args,
    check_batch,
    check_mask,
    check_mask_rows,
    check_pair,
    flag,
)
from kd_kernels.losses._module import LossModule
from kd_kernels.ops import geometry as _ops
from kd_kernels.ops._define import call

__all__ = [
    "CKALoss",
    "GramLoss",
    "ProcrustesLoss",
    "RelationLoss",
    "cka_loss",
    "gram_loss",
    "procrustes_loss",
    "relation_loss",
]

# loss -> backends with kernels (kd_kernels/ops/geometry.py).
# "cuda": kd_kernels/ops/geometry_cuda.py on csrc/cuda/geometry.cu.
_KERNELS = {
    "gram_loss": ("torch", "triton", "cuda"),  # kd_kernels/triton/geometry.py
    "cka_loss": ("torch", "triton", "cuda"),
    "relation_loss": ("torch", "triton", "cuda"),
    "procrustes_loss": ("torch", "triton", "cuda"),  # kd_kernels/triton/procrustes.py
}
# The non-tensor keyword arguments of each loss and their checks (shared with the modules).
_ARGS = {
    "gram_loss": {"center": flag, "normalize": flag, "backend": backend_choice},
    "procrustes_loss": {"center": flag, "backend": backend_choice},
    "cka_loss": {"unbiased": flag, "backend": backend_choice},
    "relation_loss": {"backend": backend_choice},
}


def _check(loss: str, student, teacher, mask, backend, *, min_rows: int, why: str, flags: dict) -> str:
    """Validate once (shapes, dtypes, devices, mask, flags) and resolve the backend."""
    check_pair(loss, student, teacher, ranks=(2, 3), min_rows=min_rows, row_what=f"rows ({why})")
    check_args(loss, _ARGS[loss], **flags, backend=backend)
    check_batch(loss, "student", student, "[B, N, Ds]")
    check_mask(loss, "mask", mask, tuple(student.shape[:-1]), student.device)
    check_mask_rows(loss, "mask", mask, min_rows, why)  # eager only (reads the mask)
    return resolve_backend(backend, student.device, loss=loss, kernels=_KERNELS[loss])


def gram_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    center: bool = True,
    normalize: bool = True,
    mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Gram-matrix Frobenius loss between student and teacher features.

    .. math::
        \ell = \lVert \bar X \bar X^\top - \bar Y \bar Y^\top \rVert_F^2
             = \lVert \bar X^\top \bar X \rVert_F^2 + \lVert \bar Y^\top \bar Y \rVert_F^2
               - 2 \lVert \bar X^\top \bar Y \rVert_F^2,

    where X̄ is the student's features with columns centred over the (kept) rows when
    ``center`` and scaled to unit Frobenius norm when ``normalize``; likewise Ȳ.

    Args:
        student: student features ``[N, Ds]`` or ``[B, N, Ds]``.
        teacher: teacher features ``[N, Dt]`` or ``[B, N, Dt]``; gets a gradient only if it
            requires grad.
        center: subtract the column means (needs N >= 2).
        normalize: scale X̃ and Ỹ to unit Frobenius norm (the loss is then in [0, 2]).
            Without it the two feature scales must match for the loss to mean anything.
        mask: optional ``[N]`` / ``[B, N]`` rows to keep (bool or 0/1 integers).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Shape:
        Output: a 0-dim tensor with the student's dtype: the loss of a ``[N, D]`` pair, or the
        mean over B of the per-item losses. There is no ``reduction`` argument.

    Paper: Bhattarai et al., "Geometry-aware representational alignment" (arXiv 2509.25253);
    their code (x-labs-xyz/feature-distillation) was not available, so this is the standard
    definition from the representational-similarity literature (docs/geometry.md §4).

    Example::

        >>> s = torch.randn(64, 32, requires_grad=True)
        >>> t = torch.randn(64, 48)
        >>> loss = kd_kernels.gram_loss(s, t)
        >>> loss.backward()
    """
    backend = _check(
        "gram_loss",
        student,
        teacher,
        mask,
        backend,
        min_rows=2 if center else 1,
        why="centring needs N >= 2",
        flags={"center": center, "normalize": normalize},
    )
    return call(_ops.gram_fwd, student, teacher, mask, center, normalize, backend)[0]


def procrustes_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    center: bool = True,
    mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Squared (orthogonal) Procrustes distance between student and teacher features.

    .. math::
        \ell = \min_{Q^\top Q = I} \lVert \bar X - \bar Y Q \rVert_F^2
             = 2 - 2 \lVert \bar X^\top \bar Y \rVert_*,

    with X̄, Ȳ column-centred over the (kept) rows when ``center`` and always scaled to unit
    Frobenius norm; ‖·‖_* is the nuclear norm of the Ds x Dt matrix X̄ᵀȲ (different widths
    need no projector: this is the zero-padded partial-isometry problem). The loss is in [0, 2].

    The gradient uses the polar factor U Vᵀ of X̄ᵀȲ = UΣVᵀ. It is exact when the nonzero
    singular values repeat; singular directions with σ = 0 are dropped, which is exact when
    rank(X̄ᵀȲ) = rank X̄ = rank Ȳ (e.g. N <= D, generic data) and a subgradient otherwise.
    The SVD of the Ds x Dt matrix runs in float32 (float64 for float64 inputs).

    Args:
        student: student features ``[N, Ds]`` or ``[B, N, Ds]``.
        teacher: teacher features ``[N, Dt]`` or ``[B, N, Dt]``; gets a gradient only if it
            requires grad.
        center: subtract the column means (needs N >= 2).
        mask: optional ``[N]`` / ``[B, N]`` rows to keep (bool or 0/1 integers).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Shape:
        Output: a 0-dim tensor with the student's dtype (mean over B for batched inputs).
        There is no ``reduction`` argument.

    Paper: Bhattarai et al., arXiv 2509.25253 (standard definition, docs/geometry.md §7; their code
    was not available). The angular variant arccos‖X̄ᵀȲ‖_* is not provided.

    Example::

        >>> s = torch.randn(64, 32, requires_grad=True)
        >>> t = torch.randn(64, 48)
        >>> loss = kd_kernels.procrustes_loss(s, t)
        >>> loss.backward()
    """
    backend = _check(
        "procrustes_loss",
        student,
        teacher,
        mask,
        backend,
        min_rows=2 if center else 1,
        why="centring needs N >= 2",
        flags={"center": center},
    )
    return call(_ops.procrustes_fwd, student, teacher, mask, center, backend)[0]


def cka_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    unbiased: bool = False,
    mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""One minus linear centred kernel alignment (CKA) between student and teacher features.

    .. math::
        \ell = 1 - \frac{\mathrm{HSIC}(K, L)}{\sqrt{\mathrm{HSIC}(K, K)\,\mathrm{HSIC}(L, L)}},
        \qquad K = XX^\top,\ L = YY^\top.

    Biased (default, HSIC₀): CKA = ‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F) with column-centred X̃, Ỹ.
    ``unbiased=True`` uses the unbiased HSIC₁ estimator of Song et al. (2012) (Kornblith's
    ``debiased`` option, U-centred Gram matrices; needs N >= 4). Its cross term can be
    negative, so the unbiased CKA can be < 0 and the loss > 1.

    Degenerate case: when HSIC(K, K) or HSIC(L, L) is not positive (constant features, or the
    unbiased estimator at tiny N), CKA is undefined; the loss is then 1 (CKA taken as 0) with
    a zero gradient.

    Args:
        student: student features ``[N, Ds]`` or ``[B, N, Ds]``.
        teacher: teacher features ``[N, Dt]`` or ``[B, N, Dt]``; gets a gradient only if it
            requires grad.
        unbiased: use the unbiased HSIC₁ estimator instead of the biased HSIC₀.
        mask: optional ``[N]`` / ``[B, N]`` rows to keep (bool or 0/1 integers), e.g. the
            non-padding tokens (the common LLM ``CKALoss`` includes padding unless masked).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Shape:
        Output: a 0-dim tensor with the student's dtype (mean over B for batched inputs).
        There is no ``reduction`` argument.

    Paper: Kornblith et al., "Similarity of neural network representations revisited" (ICML
    2019); as a KD loss, Zhou et al., "Rethinking CKA in knowledge distillation" (IJCAI 2024).
    Matches google-research ``representation_similarity`` (``cka`` with ``center_gram``).
    Note that the common LLM-KD ``CKALoss`` returns 1 − √CKA, and PCKA uses uncentred
    alignment (docs/geometry.md §5); neither is this loss.

    Example::

        >>> s = torch.randn(64, 32, requires_grad=True)
        >>> t = torch.randn(64, 48)
        >>> loss = kd_kernels.cka_loss(s, t)
        >>> loss.backward()
    """
    backend = _check(
        "cka_loss",
        student,
        teacher,
        mask,
        backend,
        min_rows=4 if unbiased else 2,
        why="unbiased CKA needs N >= 4" if unbiased else "centring needs N >= 2",
        flags={"unbiased": unbiased},
    )
    return call(_ops.cka_fwd, student, teacher, mask, unbiased, backend)[0]


def relation_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Relation-matrix distillation (LLaVA-KD RDist reading): cosine of the self-similarities.

    .. math::
        \ell = 1 - \frac{\langle R_s, R_t \rangle_F}{\lVert R_s \rVert_F \lVert R_t \rVert_F},
        \qquad R = \hat N \hat N^\top,\ \hat n_i = \frac{x_i}{\max(\lVert x_i \rVert, 10^{-12})}

    (``F.normalize`` of each row, then the N x N cosine self-similarity; no centring). The
    loss is in [0, 2]; R_s and R_t are never formed when N > max(Ds, Dt).

    Args:
        student: student features ``[N, Ds]`` or ``[B, N, Ds]`` (e.g. visual tokens).
        teacher: teacher features ``[N, Dt]`` or ``[B, N, Dt]``; gets a gradient only if it
            requires grad.
        mask: optional ``[N]`` / ``[B, N]`` rows to keep (bool or 0/1 integers).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Shape:
        Output: a 0-dim tensor with the student's dtype (mean over B for batched inputs).
        There is no ``reduction`` argument.

    Paper: Cai et al., "LLaVA-KD" (arXiv 2410.16236, ICCV 2025). Their training code is not
    released; the released model code forms exactly this normalised self-similarity
    (``F.normalize(image_features, dim=-1)``), and the cosine objective is an assumption
    (docs/geometry.md §6).

    Example::

        >>> s = torch.randn(2, 64, 32, requires_grad=True)
        >>> t = torch.randn(2, 64, 48)
        >>> loss = kd_kernels.relation_loss(s, t)
        >>> loss.backward()
    """
    backend = _check("relation_loss", student, teacher, mask, backend, min_rows=1, why="N >= 1", flags={})
    return call(_ops.relation_fwd, student, teacher, mask, backend)[0]


class GramLoss(LossModule, function=gram_loss, spec=_ARGS["gram_loss"]):
    """Module form of :func:`gram_loss`; ``forward(student, teacher, mask=None)``."""

    def __init__(self, *, center: bool = True, normalize: bool = True, backend: str = "auto") -> None:
        super().__init__(center=center, normalize=normalize, backend=backend)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return gram_loss(
            student, teacher, center=self.center, normalize=self.normalize, mask=mask, backend=self.backend
        )


class ProcrustesLoss(LossModule, function=procrustes_loss, spec=_ARGS["procrustes_loss"]):
    """Module form of :func:`procrustes_loss`; ``forward(student, teacher, mask=None)``."""

    def __init__(self, *, center: bool = True, backend: str = "auto") -> None:
        super().__init__(center=center, backend=backend)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return procrustes_loss(student, teacher, center=self.center, mask=mask, backend=self.backend)


class CKALoss(LossModule, function=cka_loss, spec=_ARGS["cka_loss"]):
    """Module form of :func:`cka_loss`; ``forward(student, teacher, mask=None)``."""

    def __init__(self, *, unbiased: bool = False, backend: str = "auto") -> None:
        super().__init__(unbiased=unbiased, backend=backend)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return cka_loss(student, teacher, unbiased=self.unbiased, mask=mask, backend=self.backend)


class RelationLoss(LossModule, function=relation_loss, spec=_ARGS["relation_loss"]):
    """Module form of :func:`relation_loss`; ``forward(student, teacher, mask=None)``."""

    def __init__(self, *, backend: str = "auto") -> None:
        super().__init__(backend=backend)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return relation_loss(student, teacher, mask=mask, backend=self.backend)
