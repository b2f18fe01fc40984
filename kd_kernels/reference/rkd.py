"""RKD (Park et al., CVPR 2019) as the upstream code computes it: the test oracle and the
benchmark baseline, never the hot path.

A literal transcription of lenscloth/RKD ``metric/utils.py::pdist`` and
``metric/loss.py::RkdDistance`` / ``RKdAngle`` (identical in HobbitLong/RepDistiller and
megvii-research/mdistiller), naive memory and all: the angle loss materializes N x N x D
difference tensors and N x N x N angle tensors for each network. Upstream wraps the teacher
in ``torch.no_grad``; here it is not, so a teacher that requires grad gets its true gradient
(the teacher never requires grad in distillation, and then both agree). See docs/rkd.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rkd_angle_loss", "rkd_distance_loss", "rkd_loss"]


def _pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pairwise Euclidean distances through the Gram matrix, squared distances clamped at
    ``eps``, the diagonal set to 0 by index assignment (which also blocks its gradient)."""
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """RkdDistance: smooth-L1 between distance matrices, each divided by its mean positive
    distance. ``reduction="none"`` returns the [N, N] per-pair terms (diagonal included)."""
    t_d = _pdist(teacher)
    t_d = t_d / t_d[t_d > 0].mean()
    d = _pdist(student)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d, reduction=reduction)


def _angles(e: torch.Tensor) -> torch.Tensor:
    """psi[a, b, c] = cosine at vertex a between b and c, as a flat N^3 vector."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)
    norm = F.normalize(diff, p=2, dim=2)
    return torch.bmm(norm, norm.transpose(1, 2)).view(-1)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """RKdAngle: smooth-L1 between the N^3 triplet cosines (degenerate triples count as 0).
    ``reduction="none"`` returns the [N] per-anchor means over the N^2 (b, c) pairs."""
    n = student.shape[0]
    loss = F.smooth_l1_loss(_angles(student), _angles(teacher), reduction="none")
    if reduction == "none":
        return loss.view(n, n, n).mean(dim=(1, 2))
    return loss.sum() if reduction == "sum" else loss.mean()


def rkd_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> torch.Tensor:
    """RepDistiller RKDLoss: ``distance_weight * distance + angle_weight * angle`` (means)."""
    return distance_weight * rkd_distance_loss(student, teacher) + angle_weight * rkd_angle_loss(student, teacher)
