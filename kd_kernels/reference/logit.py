"""Reference (naive, eager) logit losses: the test oracle and the benchmark baseline.

Literal transcriptions of the upstream code named below (the math is in docs/logit.md),
full ``[N, C]`` temporaries and autograd included; never used on the hot path. Same names
and signatures as the public functions in ``kd_kernels/losses/logit.py`` minus ``backend``.

* kd_loss: RepDistiller ``DistillKL`` / mdistiller ``kd_loss`` (``kl_div(...).sum(1) * T^2``).
* reverse_kl_loss: KL(q||p) (DistiLLM ``reverse_kl`` without the label mask, temperature added).
* jsd_loss: TRL ``GKDTrainer.generalized_jsd_loss`` (beta 0 / 1 endpoints special-cased).
* tvd_loss: 1/2 sum|p - q| (Liger ``LigerTVDLoss`` on softmax(z/T)).
* dist_loss: hunto/image_classification_sota ``DIST``.
* grkd_loss: the pairwise form of docs/logit.md §9, over an N x C x C broadcast.

``ignore_mask`` (True = drop the row) is applied by boolean indexing here; the means are
over the kept rows with the count clamped at 1, so a batch with every row dropped gives 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dist_loss", "grkd_loss", "jsd_loss", "kd_loss", "reverse_kl_loss", "tvd_loss"]


def _keep(student: torch.Tensor, ignore_mask: torch.Tensor | None) -> torch.Tensor:
    if ignore_mask is None:
        return torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
    return ~ignore_mask.to(torch.bool)


def _finish(per_class: torch.Tensor, reduction: str, ignore_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-class loss terms [N, C] -> the requested reduction."""
    rows = per_class.sum(1)
    keep = _keep(per_class, ignore_mask)
    if reduction == "none":
        return torch.where(keep, rows, torch.zeros_like(rows))
    kept = rows[keep]
    count = max(int(keep.sum()), 1)
    if reduction == "sum":
        return kept.sum()
    if reduction == "batchmean":
        return kept.sum() / count
    if reduction == "mean":
        return kept.sum() / (count * per_class.shape[1])
    raise ValueError(f"unknown reduction {reduction!r}")


def kd_loss(student_logits, teacher_logits, *, temperature=4.0, reduction="batchmean", ignore_mask=None):
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    per_class = F.kl_div(log_q, log_p, reduction="none", log_target=True) * temperature**2
    return _finish(per_class, reduction, ignore_mask)


def reverse_kl_loss(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", ignore_mask=None):
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    per_class = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    return _finish(per_class, reduction, ignore_mask)


def jsd_loss(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, reduction="batchmean", ignore_mask=None):
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=1)
    if beta == 0:
        per_class = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        per_class = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - b), teacher_log_probs + torch.log(b)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        per_class = b * kl_teacher + (1 - b) * kl_student
    return _finish(per_class, reduction, ignore_mask)


def tvd_loss(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", ignore_mask=None):
    q = F.softmax(student_logits / temperature, dim=1)
    p = F.softmax(teacher_logits / temperature, dim=1)
    return _finish(0.5 * (p - q).abs(), reduction, ignore_mask)


def _cosine_similarity(a, b, eps=1e-8):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _pearson_correlation(a, b, eps=1e-8):
    return _cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)


def _inter_class_relation(y_s, y_t):
    return 1 - _pearson_correlation(y_s, y_t).mean()


def _intra_class_relation(y_s, y_t):
    return _inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))


def dist_loss(student_logits, teacher_logits, *, temperature=1.0, inter_weight=1.0, intra_weight=1.0, ignore_mask=None):
    keep = _keep(student_logits, ignore_mask)
    if not bool(keep.any()):
        return (student_logits * 0).sum()
    z_s, z_t = student_logits[keep], teacher_logits[keep]
    y_s = (z_s / temperature).softmax(dim=1)
    y_t = (z_t / temperature).softmax(dim=1)
    inter_loss = temperature**2 * _inter_class_relation(y_s, y_t)
    intra_loss = temperature**2 * _intra_class_relation(y_s, y_t)
    return inter_weight * inter_loss + intra_weight * intra_loss


def grkd_loss(student_logits, teacher_logits, *, temperature=1.0, top_k=None, ignore_mask=None):
    n, c = student_logits.shape
    diff = (student_logits[:, :, None] - student_logits[:, None, :]) / temperature  # z_i - z_j, [N, C, C]
    pairs = teacher_logits[:, :, None] > teacher_logits[:, None, :]  # t_i > t_j (ties excluded)
    if top_k is not None:
        in_top = torch.zeros(n, c, dtype=torch.bool, device=student_logits.device)
        in_top.scatter_(1, torch.topk(teacher_logits, min(top_k, c), dim=1).indices, True)
        pairs = pairs & in_top[:, :, None]
    pair_loss = F.softplus(-diff) * pairs
    rows = pair_loss.sum((1, 2)) / pairs.sum((1, 2)).clamp_min(1)
    keep = _keep(student_logits, ignore_mask)
    return rows[keep].sum() / max(int(keep.sum()), 1)
