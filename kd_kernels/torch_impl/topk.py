"""PyTorch path of the divergences with an offline top-k teacher (docs/logit.md, "Top-k teachers").

The teacher of row i is given as ``indices [N, k]`` (int64, distinct class ids in ``[0, V)``) and
``logprobs [N, k]`` (its final, already tempered log-probabilities; ``-inf`` = probability 0).
The student logits ``z [N, V]`` give ``s = z / T``, ``lse = logsumexp(s)`` over the V classes and
``ls_j = s[i, idx_j] - lse`` at the k indices. Both distributions are compared over k + 1 buckets:

- the k classes: ``q_j = exp(ls_j)``, ``p_j`` = ``exp(logprobs_j)`` ("rest") or
  ``softmax(logprobs)_j`` ("renormalize");
- the rest (every class outside the k): ``q_rest = sum_{v not in K} q_v = exp(lse_out - lse)``
  with ``lse_out`` the log-sum-exp of ``s`` outside the k (no cancellation in ``1 - sum q_j``),
  ``p_rest = max(0, 1 - sum_j exp(logprobs_j))`` ("rest", k < V) or 0 ("renormalize"; and
  "rest" with k = V, where the rest bucket is empty).

With ``p_rest = 0`` the rest bucket gives exactly the dense loss of a teacher that is 0 outside
the k (each divergence's summand is linear in q where p = 0: kd 0, reverse KL +inf when
q_rest > 0, JSD ``-(1-b) log(1-b) q_rest``, TVD ``q_rest / 2``).

Row losses are those of ``torch_impl.logit._row_loss`` on the [N, k + 1] buckets. Backward
(hand-written, student only): with ``a_j = dL/dq_j`` per bucket and ``G_j = a_j q_j``,
``S = sum_j G_j`` over the k + 1 buckets,

    dL/ds_v = q_v (a_rest - S) + [v = idx_j] (G_j - a_rest q_j),   dL/dz = dL/ds / T,

a dense ``q * (per-row scalar)`` plus a scatter of k terms per row. Per kind:

- kd (scale c = T^2) / forward_kl (c = 1): ``G = -c p``, ``a_rest = -c p_rest / q_rest``;
- reverse_kl: ``G = q (ls - lt + 1)``, ``a_rest = ls_rest - lt_rest + 1``;
- jsd (0 < b < 1): ``G = (1-b) q (ls - log M)``, ``a_rest = (1-b)(ls_rest - log M_rest)``,
  ``M = b p + (1-b) q``;
- tvd: ``G = q g``, ``a_rest = g_rest``, ``g = sign(q - p) / 2``;

and ``a_rest = 0`` where ``p_rest = 0`` (kd) or ``q_rest = 0`` (the others): there
``dq_rest/ds = 0``, so the value is exact. Memory: O(N k) plus the [N, V] gradient and one
``chunk x V`` temporary or two per row chunk.
"""

from __future__ import annotations

import math

import torch

from kd_kernels.torch_impl.logit import _jsd_mode, _keep_rows, _plog, _row_loss, chunk_rows_for

KINDS = ("kd", "reverse_kl", "jsd", "tvd")


def compute_dtype(student: torch.Tensor, logprobs: torch.Tensor) -> torch.dtype:
    """float64 if the student logits or the teacher's log-probabilities are float64, else float32."""
    return torch.float64 if torch.float64 in (student.dtype, logprobs.dtype) else torch.float32


def _needs_rest(mode: str, rest: bool) -> bool:
    """Whether the student's mass outside the k classes enters the loss (not for KL(p||q) with p_rest = 0)."""
    return rest or mode not in ("kd", "forward_kl")


def _teacher_buckets(logprobs: torch.Tensor, rest: bool, dtype: torch.dtype, num_classes: int) -> torch.Tensor:
    """Teacher log-probabilities of the k + 1 buckets ``[n, k + 1]`` (the last is the rest).

    With k = V the rest bucket holds no class: its teacher mass is 0 in both modes (a rounding
    residue of ``1 - sum p`` would otherwise meet ``q_rest = 0`` and make KL(p||q) infinite)."""
    lp = logprobs.to(dtype)
    if rest and lp.shape[1] < num_classes:
        mass = lp.exp().sum(1, keepdim=True).clamp(max=1.0)
        return torch.cat([lp, torch.log1p(-mass)], dim=1)
    lt = lp - torch.logsumexp(lp, dim=1, keepdim=True)
    return torch.cat([lt, lt.new_full((lt.shape[0], 1), -math.inf)], dim=1)


def _student_chunk(z: torch.Tensor, idx: torch.Tensor, temperature: float, dtype: torch.dtype, need_rest: bool):
    """``(s [n, V], lse [n], lse_out [n])`` of one row chunk: ``s = z / T`` in ``dtype``, its row
    log-sum-exp and the log-sum-exp outside the k indices (``-inf`` when not ``need_rest``)."""
    s = z.to(dtype)
    if temperature != 1.0:
        s = s / temperature
    lse = torch.logsumexp(s, dim=1)
    if need_rest:
        lse_out = torch.logsumexp(s.scatter(1, idx, -math.inf), dim=1)
    else:
        lse_out = lse.new_full(lse.shape, -math.inf)
    return s, lse, lse_out


def topk_fwd(
    student: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    kind: str,
    rest: bool,
    beta: float,
    temperature: float,
    ignore_mask: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
):
    """Forward: ``(row_loss [N], lse_s [N], lse_out [N])`` in the compute dtype.

    ``row_loss`` is the row divergence ``kind`` (kd includes T^2; jsd with beta 0 / 1 is forward
    KL without T^2 / reverse KL) over the k + 1 buckets, 0 on dropped rows; ``lse_s`` and
    ``lse_out`` are logsumexp(z/T) over all V classes and over the classes outside the k
    (``-inf`` where the loss does not need it), the state the backward reuses.
    """
    mode = _jsd_mode(kind, beta)
    n, v = student.shape
    dtype = compute_dtype(student, logprobs)
    keep = _keep_rows(ignore_mask, n, student.device)
    need_rest = _needs_rest(mode, rest)
    row_loss = torch.empty(n, dtype=dtype, device=student.device)
    lse_s = torch.empty_like(row_loss)
    lse_out = torch.empty_like(row_loss)
    step = chunk_rows_for(v, chunk_rows)
    for a in range(0, n, step):
        b = min(a + step, n)
        idx = indices[a:b]
        s, lse, out = _student_chunk(student[a:b], idx, temperature, dtype, need_rest)
        lse_s[a:b], lse_out[a:b] = lse, out
        ls = torch.cat([s.gather(1, idx) - lse[:, None], (out - lse)[:, None]], dim=1)
        lt = _teacher_buckets(logprobs[a:b], rest, dtype, v)
        row = _row_loss(mode, ls, lt, temperature, beta)
        row_loss[a:b] = row if ignore_mask is None else torch.where(keep[a:b], row, 0.0)
    return row_loss, lse_s, lse_out


def _bucket_grads(mode: str, ls: torch.Tensor, lt: torch.Tensor, temperature: float, beta: float):
    """``(G [n, k + 1], a_rest [n])``: ``G_j = q_j dL/dq_j`` and ``a_rest = dL/dq_rest``."""
    q, p = ls.exp(), lt.exp()
    q_rest, p_rest = q[:, -1], p[:, -1]
    if mode in ("kd", "forward_kl"):
        c = temperature**2 if mode == "kd" else 1.0
        g = -c * p
        a_rest = torch.where(p_rest == 0, 0.0, -c * p_rest / q_rest)
        return g, a_rest
    if mode == "reverse_kl":
        d = ls - lt + 1.0
        g = _plog(q, d)
        a_rest = d[:, -1]
    elif mode == "jsd":
        log_m = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        d = (1.0 - beta) * (ls - log_m)
        g = _plog(q, d)
        a_rest = d[:, -1]
    elif mode == "tvd":
        d = torch.sub(q, p).sign_().mul_(0.5)
        g = q * d
        a_rest = d[:, -1]
    else:
        raise ValueError(f"topk_fwd: unknown divergence kind {mode!r}")
    return g, torch.where(q_rest == 0, 0.0, a_rest)


def topk_bwd(
    grad_row: torch.Tensor,
    student: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    lse_s: torch.Tensor,
    lse_out: torch.Tensor,
    kind: str,
    rest: bool,
    beta: float,
    temperature: float,
    ignore_mask: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Student gradient ``[N, V]`` (the student's dtype) of :func:`topk_fwd` given
    ``grad_row = dLoss/d row_loss [N]``; 0 on dropped rows."""
    mode = _jsd_mode(kind, beta)
    n, v = student.shape
    dtype = compute_dtype(student, logprobs)
    keep = _keep_rows(ignore_mask, n, student.device)
    grad_row = torch.where(keep, grad_row.to(dtype), 0.0)
    out = torch.empty_like(student, memory_format=torch.contiguous_format)
    step = chunk_rows_for(v, chunk_rows)
    for a in range(0, n, step):
        b = min(a + step, n)
        idx = indices[a:b]
        lse = lse_s[a:b].to(dtype)
        s = student[a:b].to(dtype)
        if temperature != 1.0:
            s = s / temperature
        ls_k = s.gather(1, idx) - lse[:, None]
        ls = torch.cat([ls_k, (lse_out[a:b].to(dtype) - lse)[:, None]], dim=1)
        lt = _teacher_buckets(logprobs[a:b], rest, dtype, v)
        g, a_rest = _bucket_grads(mode, ls, lt, temperature, beta)
        w = grad_row[a:b] / temperature
        row_scalar = (a_rest - g.sum(1)) * w
        scattered = (g[:, :-1] - a_rest[:, None] * ls_k.exp()) * w[:, None]
        q = torch.sub(s, lse[:, None]).exp_()  # a new chunk temporary (s may be a view of student)
        gz = q.mul_(row_scalar[:, None]).scatter_add_(1, idx, scattered)
        if ignore_mask is not None:  # dropped rows: 0 even where the row is NaN/inf
            gz = gz.masked_fill_(~keep[a:b, None], 0.0)
        out[a:b] = gz  # (casts to the student's dtype)
    return out
