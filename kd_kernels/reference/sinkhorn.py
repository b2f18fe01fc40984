"""Reference (naive, eager) optimal-transport losses: the test oracle and benchmark baseline.

* :func:`sinkhorn_loss` transcribes SinKD's ``Sinkhorn`` loss (2018cx/SinKD ``loss.py``,
  docs/sinkhorn.md §1) literally: softmax rows, ``torch.cdist(p=1)``, ``K = exp(-D/eps)``,
  ``n_iters`` plain-domain row/column normalisations of the whole B x B matrix, ``sum(P * D)``.
  The two differences from upstream: the temperature is an argument (upstream hard-codes
  T = 2, the default here) and the 1e-3 / 8e-4 scale is left to the caller.
* :func:`sinkhorn` is the textbook log-domain Sinkhorn loop with ``torch.logsumexp``.

Autograd differentiates through every iteration and keeps every iterate alive (O(n_iters)
full-size buffers); that is the point of a reference. Never used on the hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sinkhorn", "sinkhorn_loss"]


def sinkhorn_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    n_iters: int = 20,
) -> torch.Tensor:
    """SinKD loss as 2018cx/SinKD computes it, without the 1e-3 scale."""
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    cost = torch.cdist(p_s, p_t, p=1)
    x = torch.exp(-cost / epsilon)
    for _ in range(n_iters):
        x = x / torch.sum(x, dim=1, keepdim=True)
        x = x / torch.sum(x, dim=0, keepdim=True)
    return torch.sum(x * cost)


def sinkhorn(
    cost: torch.Tensor,
    *,
    epsilon: float = 0.1,
    n_iters: int = 100,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-domain entropic OT: transport plans with the shape of ``cost`` ([B, n, m] or [n, m])."""
    unbatched = cost.dim() == 2
    c = cost.unsqueeze(0) if unbatched else cost
    nb, n, m = c.shape
    if a is None:
        a = torch.full((n,), 1.0 / n, dtype=c.dtype, device=c.device)
    if b is None:
        b = torch.full((m,), 1.0 / m, dtype=c.dtype, device=c.device)
    log_a = torch.log(a).expand(nb, n)
    log_b = torch.log(b).expand(nb, m)
    f = torch.zeros(nb, n, dtype=c.dtype, device=c.device)
    g = torch.zeros(nb, m, dtype=c.dtype, device=c.device)
    for _ in range(n_iters):
        f = epsilon * log_a - epsilon * torch.logsumexp((g[:, None, :] - c) / epsilon, dim=2)
        g = epsilon * log_b - epsilon * torch.logsumexp((f[:, :, None] - c) / epsilon, dim=1)
    plan = torch.exp((f[:, :, None] + g[:, None, :] - c) / epsilon)
    return plan[0] if unbatched else plan
