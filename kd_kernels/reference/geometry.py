"""Reference (oracle) implementations of the feature-geometry losses (docs/geometry.md).

Literal N x N Gram-form transcriptions with naive memory: every loss builds the N x N
matrices X Xᵀ and Y Yᵀ (Procrustes builds X̄ᵀȲ and takes its nuclear norm). Masked rows are
removed by boolean indexing and batched inputs ``[B, N, D]`` are a Python loop over B
followed by a mean, which is fine here and only here: this module is the test oracle and
the benchmark baseline, never the hot path. Gradients come from autograd, for the teacher
too when it requires grad. Works in any floating dtype (the tests run it in float64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["cka_loss", "gram_loss", "procrustes_loss", "relation_loss"]


def _per_item(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], student, teacher, mask) -> torch.Tensor:
    """Apply ``fn`` to each (student, teacher) item's kept rows; mean over the batch."""
    if student.dim() == 2:
        student, teacher = student[None], teacher[None]
        mask = None if mask is None else mask[None]
    losses = []
    for b in range(student.shape[0]):
        s, t = student[b], teacher[b]
        if mask is not None:
            keep = mask[b].bool()
            s, t = s[keep], t[keep]
        losses.append(fn(s, t))
    return torch.stack(losses).mean()


def _center_scale(x: torch.Tensor, center: bool, normalize: bool) -> torch.Tensor:
    """Column-centre (x - mean over rows) and scale to unit Frobenius norm (floored at 1e-12)."""
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    if normalize:
        x = x / torch.linalg.matrix_norm(x).clamp_min(1e-12)
    return x


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0 (the degenerate-CKA rule of the PyTorch path)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def gram_loss(student, teacher, *, center: bool = True, normalize: bool = True, mask=None) -> torch.Tensor:
    """‖X̄X̄ᵀ − ȲȲᵀ‖_F² with the two N x N Gram matrices materialised."""

    def one(x, y):
        xb, yb = _center_scale(x, center, normalize), _center_scale(y, center, normalize)
        return ((xb @ xb.T - yb @ yb.T) ** 2).sum()

    return _per_item(one, student, teacher, mask)


def procrustes_loss(student, teacher, *, center: bool = True, mask=None) -> torch.Tensor:
    """2 − 2‖X̄ᵀȲ‖_* (nuclear norm through the SVD; X̄, Ȳ centred if ``center``, unit Frobenius)."""

    def one(x, y):
        xb, yb = _center_scale(x, center, True), _center_scale(y, center, True)
        return 2 - 2 * torch.linalg.matrix_norm(xb.T @ yb, ord="nuc")

    return _per_item(one, student, teacher, mask)


def _center_gram(k: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Kornblith et al.'s ``center_gram``: H K H (biased) or the U-centring of Székely-Rizzo."""
    n = k.shape[0]
    if unbiased:
        k = k - torch.diag(torch.diag(k))
        means = k.sum(dim=0) / (n - 2)
        means = means - means.sum() / (2 * (n - 1))
        k = k - means[:, None] - means[None, :]
        return k - torch.diag(torch.diag(k))
    means = k.mean(dim=0)
    means = means - means.mean() / 2
    return k - means[:, None] - means[None, :]


def cka_loss(student, teacher, *, unbiased: bool = False, mask=None) -> torch.Tensor:
    """1 − CKA(K, L) with K = XXᵀ, L = YYᵀ centred by ``center_gram`` (Kornblith's ``cka``).

    When ‖K̃‖_F·‖L̃‖_F is not positive (constant features) the CKA is taken as 0 (loss 1).
    """

    def one(x, y):
        k, l_ = _center_gram(x @ x.T, unbiased), _center_gram(y @ y.T, unbiased)
        num = (k * l_).sum()
        return 1 - _safe_ratio(num, torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_))

    return _per_item(one, student, teacher, mask)


def relation_loss(student, teacher, *, mask=None) -> torch.Tensor:
    """1 − cos(vec R_s, vec R_t), R = N̂N̂ᵀ with N̂ = F.normalize(rows, eps=1e-12)."""

    def one(x, y):
        nx, ny = F.normalize(x, dim=-1, eps=1e-12), F.normalize(y, dim=-1, eps=1e-12)
        return 1 - F.cosine_similarity((nx @ nx.T).flatten(), (ny @ ny.T).flatten(), dim=0)

    return _per_item(one, student, teacher, mask)
