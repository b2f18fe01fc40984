"""Memory-efficient PyTorch path for the logit losses (KD, reverse KL, JSD, TVD, DIST, GRKD).

Plain functions on tensors with hand-written forward and backward (no autograd inside).
They are the CPU kernels, the GPU fallback and the blueprint of the fused GPU kernels
(derivations: docs/logit.md). Rows are processed in chunks so that at most a few
``chunk x C`` temporaries are alive at once; the forward saves only per-row scalars
(the log-sum-exp of ``z/T`` for student and teacher) and the backward recomputes the
probabilities from them (docs/logit.md §2).

Precision: fp16/bf16/fp32 inputs are computed in float32, float64 stays float64 (if either
input is float64, both are computed in float64). Per-row losses and saved statistics are
returned in that compute dtype; gradients are returned in each input's dtype.

Masks: ``ignore_mask`` is a bool ``[N]`` tensor (True = drop the row) or None. Dropped rows
get zero loss and zero gradient (selected with ``torch.where``, so garbage such as inf/NaN
logits in a dropped row never leaks into the result). No host syncs: every count is a
device tensor and every loop runs over static shapes.

Non-finite logits: NaN or +inf in a kept row gives a NaN row loss. −inf is a class of
probability 0 (vocabulary masking): terms ``p * (log p - log q)`` with ``p == 0`` are 0
(``_plog``), so −inf in student and teacher at the same classes contributes 0 with zero
gradient there, and a −inf student logit where the teacher has mass gives +inf (forward KL),
as the math says; bounded losses (JSD, TVD) stay finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# At most this many elements per [rows, C] temporary (2**23 fp32 = 32 MB); a chunk holds
# about 6-8 such temporaries, so the extra memory stays near 256 MB whatever rows x C is
# (rows=8192, C=128256 fp32 would be 4.2 GB per full copy). 8M elements per launch is still
# far past the size where GPU kernels reach their bandwidth. Capped at 4096 rows.
CHUNK_ELEMENTS = 2**23
MAX_CHUNK_ROWS = 4096
# GRKD materialises a [rows, classes_i, C] pair tile; keep it at 2**24 elements (64 MB fp32).
PAIR_TILE_ELEMENTS = 2**24
# F.softplus switches to the identity above this argument; the backward mirrors it.
_SOFTPLUS_THRESHOLD = 20.0

DIVERGENCES = ("kd", "reverse_kl", "jsd", "tvd")


def compute_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """float64 if either input is float64, else float32."""
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def chunk_rows_for(num_classes: int, chunk_rows: int | None = None) -> int:
    """Rows per chunk: ``chunk_rows`` when given (tests force tiny chunks), else a budget."""
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // max(num_classes, 1)))


def _keep_rows(ignore_mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Bool [N]: True for the rows that count."""
    if ignore_mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return ~ignore_mask.to(torch.bool)


def _log_probs(
    z: torch.Tensor, temperature: float, dtype: torch.dtype, lse: torch.Tensor | None = None, fused: bool = True
):
    """log_softmax(z/T) of one chunk in ``dtype``; also returns the row log-sum-exp of z/T.

    With ``lse`` given (backward) the saved statistic is reused, not recomputed.
    """
    if lse is not None:  # backward: z/T - lse in one pass
        return torch.add(lse.to(dtype).neg()[:, None], z.to(dtype), alpha=1.0 / temperature), lse
    x = z.to(dtype)
    if temperature != 1.0:
        x = x / temperature
    if lse is None and not fused:  # the rows exactly as the backward rebuilds them (x - lse)
        lse = torch.logsumexp(x, dim=1)
    if lse is None:
        # One fused log_softmax pass; the log-sum-exp is read off at the row maximum, where
        # log_softmax = (x_max - max) - log S = -log S exactly: lse = max + log S, as logsumexp.
        ls = F.log_softmax(x, dim=1)
        mx, idx = x.max(dim=1, keepdim=True)
        return ls, (mx - ls.gather(1, idx)).squeeze(1)
    return x - lse[:, None], lse


# ---------------------------------------------------------------------------------------
# KD, reverse KL, generalized JSD, TVD (docs/logit.md §3-6)
#
# Per row, with l_s = log q = log_softmax(z_s/T), l_t = log p = log_softmax(z_t/T):
#   kd:          L = T^2 * sum_c p (l_t - l_s)                      (Hinton, forward KL)
#                dL/dz_s = T (q - p)
#                dL/dz_t = T p * ((l_t - l_s) - KL(p||q))
#   reverse_kl:  L = sum_c q (l_s - l_t)
#                dL/dz_s = q * ((l_s - l_t) - L) / T
#                dL/dz_t = (p - q) / T
#   jsd (0<b<1): log M = logaddexp(log b + l_t, log(1-b) + l_s)
#                L = b KL(p||M) + (1-b) KL(q||M)
#                dL/dz_s = (1-b) q * ((l_s - log M) - KL(q||M)) / T
#                dL/dz_t =    b  p * ((l_t - log M) - KL(p||M)) / T
#       b == 0:  forward KL(p||q) without T^2 (the kd formulas divided by T^2)
#       b == 1:  reverse KL(q||p)              (the reverse_kl formulas)
#   tvd:         L = 1/2 sum_c |p - q|,  g = 1/2 sign(q - p)  (sign(0) = 0)
#                dL/dz_s = q * (g - <q, g>) / T
#                dL/dz_t = p * (-g + <p, g>) / T
# Each gradient row is finally multiplied by the incoming grad_row[i] (0 for dropped rows).
# ---------------------------------------------------------------------------------------


def _jsd_mode(kind: str, beta: float) -> str:
    """Which closed form a (kind, beta) pair uses: the TRL/Liger endpoint rule for JSD."""
    if kind == "jsd":
        if beta == 0.0:
            return "forward_kl"
        if beta == 1.0:
            return "reverse_kl"
    return kind


def _plog(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``p * d`` with ``0 * d = 0`` where ``p == 0`` (a class of probability 0: a -inf logit,
    vocabulary masking, where ``d`` is ``-inf - -inf = NaN`` or ``±inf``). NaN in ``p`` (NaN
    input) fails ``p == 0`` and still propagates; ``p > 0`` with ``d = inf`` gives inf (KL)."""
    return torch.where(p == 0, 0.0, p * d)


def _plog_(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """:func:`_plog` in place in ``d`` (a temporary): ``d *= p``, then 0 where ``p == 0``."""
    return d.mul_(p).masked_fill_(p == 0, 0.0)


def _plog_sum(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Row sums of :func:`_plog` (``d`` is a temporary, zeroed in place where ``p == 0``)."""
    return torch.einsum("ij,ij->i", p, d.masked_fill_(p == 0, 0.0))


def _row_loss(mode: str, ls: torch.Tensor, lt: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """Per-row loss of one chunk (before masking)."""
    if mode in ("kd", "forward_kl"):
        row = _plog_sum(lt.exp(), lt - ls)
        return row * temperature**2 if mode == "kd" else row
    if mode == "reverse_kl":
        return _plog_sum(ls.exp(), ls - lt)
    if mode == "jsd":
        log_m = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        return beta * _plog_(lt.exp(), lt - log_m).sum(1) + (1.0 - beta) * _plog_(ls.exp(), ls - log_m).sum(1)
    if mode == "tvd":
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(1)
    raise ValueError(f"unknown logit divergence {mode!r}")


def _row_grads(mode: str, ls, lt, temperature: float, beta: float, need_student: bool, need_teacher: bool):
    """d(row loss)/dz_s and d(row loss)/dz_t for one chunk (None where not needed)."""
    gs = gt = None
    if mode in ("kd", "forward_kl") and not need_teacher:  # the common case, in place: q - p
        scale = temperature if mode == "kd" else 1.0 / temperature
        return ls.exp_().sub_(lt.exp_()).mul_(scale), None
    q, p = ls.exp(), lt.exp()
    if mode in ("kd", "forward_kl"):
        scale = temperature if mode == "kd" else 1.0 / temperature  # T^2 / T or 1 / T
        if need_student:
            gs = torch.sub(q, p).mul_(scale)
        if need_teacher:
            pd = _plog_(p, lt - ls)  # p (d - <p, d>) = pd - p <1, pd>, 0 on masked classes
            gt = scale * (pd - p * pd.sum(1, keepdim=True))
    elif mode == "reverse_kl":
        if need_student:
            qd = _plog_(q, ls - lt)
            gs = qd.sub_(q * qd.sum(1, keepdim=True)).div_(temperature)
        if need_teacher:
            gt = torch.sub(p, q).div_(temperature)
    elif mode == "jsd":
        log_m = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        if need_student:
            qd = _plog_(q, ls - log_m)
            gs = (1.0 - beta) / temperature * (qd - q * qd.sum(1, keepdim=True))
        if need_teacher:
            pd = _plog_(p, lt - log_m)
            gt = beta / temperature * (pd - p * pd.sum(1, keepdim=True))
    elif mode == "tvd":
        g = torch.sub(q, p).sign_().mul_(0.5)
        if need_student:
            gs = (g - (q * g).sum(1, keepdim=True)).mul_(q).div_(temperature)
        if need_teacher:
            gt = ((p * g).sum(1, keepdim=True) - g).mul_(p).div_(temperature)
    else:
        raise ValueError(f"unknown logit divergence {mode!r}")
    return gs, gt


def divergence_fwd(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    beta: float = 0.5,
    ignore_mask: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
):
    """Forward of kd / reverse_kl / jsd / tvd.

    Returns ``(row_loss [N], lse_s [N], lse_t [N])`` in the compute dtype (float32, or
    float64 for float64 inputs): ``row_loss`` is the per-row loss (for "kd" already
    multiplied by T^2), 0 on dropped rows; ``lse_s``/``lse_t`` are logsumexp(z/T) over
    classes, the only state the backward needs. ``beta`` is used by "jsd" only.
    """
    mode = _jsd_mode(kind, beta)
    n, c = student.shape
    dtype = compute_dtype(student, teacher)
    keep = _keep_rows(ignore_mask, n, student.device)
    row_loss = torch.empty(n, dtype=dtype, device=student.device)
    lse_s = torch.empty_like(row_loss)
    lse_t = torch.empty_like(row_loss)
    step = chunk_rows_for(c, chunk_rows)
    for a in range(0, n, step):
        b = min(a + step, n)
        ls, lse_s[a:b] = _log_probs(student[a:b], temperature, dtype)
        lt, lse_t[a:b] = _log_probs(teacher[a:b], temperature, dtype)
        row = _row_loss(mode, ls, lt, temperature, beta)
        row_loss[a:b] = row if ignore_mask is None else torch.where(keep[a:b], row, 0.0)
    return row_loss, lse_s, lse_t


def divergence_bwd(
    kind: str,
    grad_row: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    temperature: float,
    beta: float = 0.5,
    ignore_mask: torch.Tensor | None = None,
    need_student: bool = True,
    need_teacher: bool = False,
    *,
    chunk_rows: int | None = None,
):
    """Backward of :func:`divergence_fwd` given ``grad_row`` = dLoss/d(row_loss) ``[N]``.

    Returns ``(grad_student, grad_teacher)`` in each input's dtype; a gradient that is not
    needed is an empty tensor.
    """
    mode = _jsd_mode(kind, beta)
    n, c = student.shape
    dtype = compute_dtype(student, teacher)
    keep = _keep_rows(ignore_mask, n, student.device)
    grad_row = torch.where(keep, grad_row.to(dtype), 0.0)
    gs_out = torch.empty_like(student) if need_student else student.new_empty(0)
    gt_out = torch.empty_like(teacher) if need_teacher else teacher.new_empty(0)
    step = chunk_rows_for(c, chunk_rows)
    for a in range(0, n, step):
        b = min(a + step, n)
        ls, _ = _log_probs(student[a:b], temperature, dtype, lse_s[a:b].to(dtype))
        lt, _ = _log_probs(teacher[a:b], temperature, dtype, lse_t[a:b].to(dtype))
        gs, gt = _row_grads(mode, ls, lt, temperature, beta, need_student, need_teacher)
        w = grad_row[a:b, None]
        kept = keep[a:b, None]
        for need, g, g_out in ((need_student, gs, gs_out), (need_teacher, gt, gt_out)):
            if not need:
                continue
            if ignore_mask is not None:  # dropped rows: 0 even where the row is NaN/inf
                g_out[a:b] = g.mul_(w).masked_fill_(~kept, 0.0)
            elif g_out.dtype == g.dtype:
                torch.mul(g, w, out=g_out[a:b])
            else:
                g_out[a:b] = g.mul_(w)
    return gs_out, gt_out


# Thin per-loss entry points. Every backend's kernel for these losses has the same contract:
#   <loss>_fwd(student, teacher, temperature, [beta,] ignore_mask) -> (row_loss, lse_s, lse_t)
#   <loss>_bwd(grad_row, student, teacher, lse_s, lse_t, temperature, [beta,] ignore_mask,
#              need_student, need_teacher) -> (grad_student, grad_teacher)
# with row_loss/lse_* float32 [N] (float64 for float64 inputs), kd's row_loss including T^2,
# dropped rows 0, and unneeded grads as empty tensors.


def kd_fwd(student, teacher, temperature, ignore_mask=None, *, chunk_rows=None):
    return divergence_fwd("kd", student, teacher, temperature, 0.0, ignore_mask, chunk_rows=chunk_rows)


def kd_bwd(
    grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, need_student, need_teacher, *, chunk_rows=None
):
    return divergence_bwd(
        "kd",
        grad_row,
        student,
        teacher,
        lse_s,
        lse_t,
        temperature,
        0.0,
        ignore_mask,
        need_student,
        need_teacher,
        chunk_rows=chunk_rows,
    )


def reverse_kl_fwd(student, teacher, temperature, ignore_mask=None, *, chunk_rows=None):
    return divergence_fwd("reverse_kl", student, teacher, temperature, 0.0, ignore_mask, chunk_rows=chunk_rows)


def reverse_kl_bwd(
    grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, need_student, need_teacher, *, chunk_rows=None
):
    return divergence_bwd(
        "reverse_kl",
        grad_row,
        student,
        teacher,
        lse_s,
        lse_t,
        temperature,
        0.0,
        ignore_mask,
        need_student,
        need_teacher,
        chunk_rows=chunk_rows,
    )


def jsd_fwd(student, teacher, beta, temperature, ignore_mask=None, *, chunk_rows=None):
    return divergence_fwd("jsd", student, teacher, temperature, beta, ignore_mask, chunk_rows=chunk_rows)


def jsd_bwd(
    grad_row,
    student,
    teacher,
    lse_s,
    lse_t,
    beta,
    temperature,
    ignore_mask,
    need_student,
    need_teacher,
    *,
    chunk_rows=None,
):
    return divergence_bwd(
        "jsd",
        grad_row,
        student,
        teacher,
        lse_s,
        lse_t,
        temperature,
        beta,
        ignore_mask,
        need_student,
        need_teacher,
        chunk_rows=chunk_rows,
    )


def tvd_fwd(student, teacher, temperature, ignore_mask=None, *, chunk_rows=None):
    return divergence_fwd("tvd", student, teacher, temperature, 0.0, ignore_mask, chunk_rows=chunk_rows)


def tvd_bwd(
    grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, need_student, need_teacher, *, chunk_rows=None
):
    return divergence_bwd(
        "tvd",
        grad_row,
        student,
        teacher,
        lse_s,
        lse_t,
        temperature,
        0.0,
        ignore_mask,
        need_student,
        need_teacher,
        chunk_rows=chunk_rows,
    )


# ---------------------------------------------------------------------------------------
# DIST (docs/logit.md §8)
#
# y_s = softmax(z_s/τ), y_t = softmax(z_t/τ); kept rows w_i ∈ {0,1}, K = Σ w_i.
# pearson(a, b) = <â, b̂> / (|â| |b̂| + eps), â = a - mean(a), eps = 1e-8.
#   r_i (row i over the C classes), r_c (class c over the K kept rows)
#   L = τ² (β (1 - Σ_i w_i r_i / K) + γ (1 - Σ_c r_c / C)) · [K > 0]
# Forward, one row pass: both softmaxes, the row Pearson pieces, and per-class centred
# moments merged chunk by chunk (Chan et al.: means, Σâ², Σb̂², Σâb̂ over kept rows; stable,
# no Σy² - Kμ² cancellation). Saved: lse_s, lse_t [N] and the class stats [5, C] =
# (μ_s, μ_t, n = |â|, m = |b̂|, s = <â, b̂>).
# Backward (per row chunk, recomputing y): with q = nm + eps,
#   ∂r/∂a = b̂/q - s m â/(n q²),   ∂r/∂b = â/q - s n b̂/(m q²)   (0 when n = 0 or m = 0, as
#   torch's norm backward gives);
#   g_ys[i,c] = -τ² [β w_i/K ∂r_i/∂a_c + γ/C w_i ∂r_c/∂a_i] · [K > 0] · grad_out
#   dL/dz_s = y_s ⊙ (g_ys - <g_ys, y_s>) / τ, and likewise for the teacher.
# ---------------------------------------------------------------------------------------

DIST_EPS = 1e-8


def _pearson_grads(a_hat, b_hat, n, m, s, need_a: bool, need_b: bool):
    """∂r/∂a and ∂r/∂b of r = s/(nm + eps) for centred vectors (broadcast shapes)."""
    q = n * m + DIST_EPS
    tiny = torch.finfo(a_hat.dtype).tiny
    # s/n first: it is bounded by m (Cauchy-Schwarz) and exactly 0 when n = 0
    ga = b_hat / q - (s / n.clamp_min(tiny) * m / (q * q)) * a_hat if need_a else None
    gb = a_hat / q - (s / m.clamp_min(tiny) * n / (q * q)) * b_hat if need_b else None
    return ga, gb


def _row_centred(ys, yt):
    """Centred rows and their norms/inner products: (â, b̂, n, m, s), stats as [rows, 1]."""
    a_hat = ys - ys.mean(1, keepdim=True)
    b_hat = yt - yt.mean(1, keepdim=True)
    n = a_hat.norm(dim=1, keepdim=True)
    m = b_hat.norm(dim=1, keepdim=True)
    s = (a_hat * b_hat).sum(1, keepdim=True)
    return a_hat, b_hat, n, m, s


def dist_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    inter_weight: float,
    intra_weight: float,
    ignore_mask: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
):
    """Forward of DIST. Returns ``(loss [], lse_s [N], lse_t [N], class_stats [5, C])``."""
    n_rows, c = student.shape
    dtype = compute_dtype(student, teacher)
    dev = student.device
    keep = _keep_rows(ignore_mask, n_rows, dev)
    lse_s = torch.empty(n_rows, dtype=dtype, device=dev)
    lse_t = torch.empty_like(lse_s)
    zeros_c = torch.zeros(c, dtype=dtype, device=dev)
    mu_s, mu_t, m2_s, m2_t, c_st = (zeros_c.clone() for _ in range(5))
    count = torch.zeros((), dtype=dtype, device=dev)
    inter_sum = torch.zeros((), dtype=dtype, device=dev)
    step = chunk_rows_for(c, chunk_rows)
    for a in range(0, n_rows, step):
        b = min(a + step, n_rows)
        ls, lse_s[a:b] = _log_probs(student[a:b], temperature, dtype, fused=False)
        lt, lse_t[a:b] = _log_probs(teacher[a:b], temperature, dtype, fused=False)
        kept = keep[a:b, None]
        masked = ignore_mask is not None  # without a mask every w is 1: skip the selects
        if masked:
            ys, yt = torch.where(kept, ls.exp(), 0.0), torch.where(kept, lt.exp(), 0.0)
        else:
            ys, yt = ls.exp_(), lt.exp_()
        w = keep[a:b].to(dtype)
        _, _, n, m, s = _row_centred(ys, yt)
        inter_sum = inter_sum + (w * (s / (n * m + DIST_EPS)).squeeze(1)).sum()
        # chunk-local class moments over the kept rows, then Chan's pairwise merge
        nb = w.sum()
        mean_bs = ((w[:, None] * ys) if masked else ys).sum(0) / nb.clamp_min(1)
        mean_bt = ((w[:, None] * yt) if masked else yt).sum(0) / nb.clamp_min(1)
        ds = (ys - mean_bs).mul_(w[:, None]) if masked else ys - mean_bs
        dt = (yt - mean_bt).mul_(w[:, None]) if masked else yt - mean_bt
        total = count + nb
        frac_b = nb / total.clamp_min(1)
        cross = count * frac_b  # n_a n_b / (n_a + n_b)
        delta_s = mean_bs - mu_s
        delta_t = mean_bt - mu_t
        mu_s = mu_s + delta_s * frac_b
        mu_t = mu_t + delta_t * frac_b
        m2_s = m2_s + (ds * ds).sum(0) + delta_s * delta_s * cross
        m2_t = m2_t + (dt * dt).sum(0) + delta_t * delta_t * cross
        c_st = c_st + (ds * dt).sum(0) + delta_s * delta_t * cross
        count = total
    n_c, m_c = m2_s.clamp_min(0).sqrt(), m2_t.clamp_min(0).sqrt()
    intra = 1.0 - (c_st / (n_c * m_c + DIST_EPS)).mean()
    inter = 1.0 - inter_sum / count.clamp_min(1)
    loss = temperature**2 * (inter_weight * inter + intra_weight * intra) * (count > 0).to(dtype)
    return loss, lse_s, lse_t, torch.stack([mu_s, mu_t, n_c, m_c, c_st])


def dist_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    class_stats: torch.Tensor,
    temperature: float,
    inter_weight: float,
    intra_weight: float,
    ignore_mask: torch.Tensor | None = None,
    need_student: bool = True,
    need_teacher: bool = False,
    *,
    chunk_rows: int | None = None,
):
    """Backward of :func:`dist_fwd` given the scalar ``grad``; returns (grad_s, grad_t)."""
    n_rows, c = student.shape
    dtype = compute_dtype(student, teacher)
    keep = _keep_rows(ignore_mask, n_rows, student.device)
    count = keep.sum().to(dtype)
    scale = -(temperature**2) * grad.to(dtype) * (count > 0).to(dtype)
    row_scale = scale * inter_weight / count.clamp_min(1)
    col_scale = scale * intra_weight / c
    mu_s, mu_t, n_c, m_c, s_c = class_stats.to(dtype).unbind(0)
    gs_out = torch.empty_like(student) if need_student else student.new_empty(0)
    gt_out = torch.empty_like(teacher) if need_teacher else teacher.new_empty(0)
    step = chunk_rows_for(c, chunk_rows)
    for a in range(0, n_rows, step):
        b = min(a + step, n_rows)
        ls, _ = _log_probs(student[a:b], temperature, dtype, lse_s[a:b].to(dtype))
        lt, _ = _log_probs(teacher[a:b], temperature, dtype, lse_t[a:b].to(dtype))
        kept = keep[a:b, None]
        masked = ignore_mask is not None  # without a mask every w is 1: skip the selects
        if masked:
            ys, yt = torch.where(kept, ls.exp(), 0.0), torch.where(kept, lt.exp(), 0.0)
        else:
            ys, yt = ls.exp_(), lt.exp_()
        w = kept.to(dtype)
        ra, rb, n, m, s = _row_centred(ys, yt)
        row_ga, row_gb = _pearson_grads(ra, rb, n, m, s, need_student, need_teacher)
        ca, cb = (ys - mu_s, yt - mu_t) if not masked else ((ys - mu_s) * w, (yt - mu_t) * w)
        col_ga, col_gb = _pearson_grads(ca, cb, n_c, m_c, s_c, need_student, need_teacher)
        for need, y, row_g, col_g, out in (
            (need_student, ys, row_ga, col_ga, gs_out),
            (need_teacher, yt, row_gb, col_gb, gt_out),
        ):
            if need:
                g = torch.add(row_g.mul_(row_scale), col_g.mul_(col_scale))
                if masked:
                    g.mul_(w)
                dz = (g - (g * y).sum(1, keepdim=True)).mul_(y).div_(temperature)
                out[a:b] = torch.where(kept, dz, 0.0) if masked else dz
    return gs_out, gt_out


# ---------------------------------------------------------------------------------------
# GRKD (docs/logit.md §9)
#
# Per row, pairs P = {(i, j): t_i > t_j} (teacher logits, ties excluded; with top_k, i must
# be among the teacher's top k classes), x_ij = -(z_s,i - z_s,j)/τ:
#   row = Σ_P softplus(x_ij) / max(|P|, 1);   L = Σ_kept row / max(K, 1)
#   dL/dz_s,i -= w σ(x_ij)/τ,  dL/dz_s,j += w σ(x_ij)/τ  over P, w = 1/(max(|P|,1) max(K,1))
# (σ replaced by 1 above the softplus threshold 20, as torch's softplus backward does.)
# The loss is piecewise constant in the teacher: the teacher gets no gradient.
# Tiles: [rows, i-block, C] with rows·i-block·C <= PAIR_TILE_ELEMENTS; the first classes i
# are either a block of 0..C-1 or a block of the top-k indices (gathered).
# ---------------------------------------------------------------------------------------


def _grkd_tiles(n_rows: int, c: int, top_k: int | None, tile_elements: int | None):
    """Yield (row_start, row_end, i_start, i_end) tiles of the pair grid."""
    k = c if top_k is None else min(top_k, c)
    budget = PAIR_TILE_ELEMENTS if tile_elements is None else tile_elements
    bi = max(1, min(k, budget // c))
    rows = max(1, budget // (bi * c))
    for a in range(0, n_rows, rows):
        for i0 in range(0, k, bi):
            yield a, min(a + rows, n_rows), i0, min(i0 + bi, k)


def _grkd_tile(zs, zt, top_idx, i0, i1, temperature):
    """For a row chunk: the first-class ids (None = the range i0:i1), x_ij and the pair mask."""
    if top_idx is None:
        ii = None
        si, ti = zs[:, i0:i1], zt[:, i0:i1]
    else:
        ii = top_idx[:, i0:i1]
        si, ti = zs.gather(1, ii), zt.gather(1, ii)
    if temperature != 1.0:  # divide the [rows, C] operands, not the [rows, bi, C] pair tile
        zs, si = zs / temperature, si / temperature
    x = zs[:, None, :] - si[:, :, None]  # -(z_i - z_j)/τ, [rows, bi, C]
    mask = ti[:, :, None] > zt[:, None, :]
    return ii, x, mask


def _grkd_top_idx(teacher: torch.Tensor, top_k: int | None):
    if top_k is None:
        return None
    return torch.topk(teacher, min(top_k, teacher.shape[1]), dim=1).indices


def grkd_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    ignore_mask: torch.Tensor | None = None,
    *,
    tile_elements: int | None = None,
):
    """Forward of GRKD. Returns ``(loss [], pair_count [N] int64)``."""
    n_rows, c = student.shape
    dtype = compute_dtype(student, teacher)
    keep = _keep_rows(ignore_mask, n_rows, student.device)
    top_idx = _grkd_top_idx(teacher, top_k)
    row_sum = torch.zeros(n_rows, dtype=dtype, device=student.device)
    pairs = torch.zeros(n_rows, dtype=torch.int64, device=student.device)
    for a, b, i0, i1 in _grkd_tiles(n_rows, c, top_k, tile_elements):
        zs, zt = student[a:b].to(dtype), teacher[a:b].to(dtype)
        _, x, mask = _grkd_tile(zs, zt, None if top_idx is None else top_idx[a:b], i0, i1, temperature)
        row_sum[a:b] += torch.where(mask, F.softplus(x), 0.0).sum((1, 2))
        pairs[a:b] += mask.sum((1, 2))
        if i0 == 0:  # NaN carrier: a NaN/+inf teacher logit makes no pair (comparisons are False)
            # but must still give a NaN row; amax is NaN/+inf then, and finite with -inf (masked) classes
            row_sum[a:b] += zt.amax(1) * 0.0
    rows = torch.where(keep, row_sum / pairs.clamp_min(1).to(dtype), 0.0)
    return rows.sum() / keep.sum().clamp_min(1).to(dtype), pairs


def grkd_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    pair_count: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    ignore_mask: torch.Tensor | None = None,
    *,
    tile_elements: int | None = None,
):
    """Backward of :func:`grkd_fwd` (student only)."""
    n_rows, c = student.shape
    dtype = compute_dtype(student, teacher)
    keep = _keep_rows(ignore_mask, n_rows, student.device)
    top_idx = _grkd_top_idx(teacher, top_k)
    weight = grad.to(dtype) / (keep.sum().clamp_min(1).to(dtype) * pair_count.clamp_min(1).to(dtype) * temperature)
    gs = torch.zeros(n_rows, c, dtype=dtype, device=student.device)
    for a, b, i0, i1 in _grkd_tiles(n_rows, c, top_k, tile_elements):
        zs, zt = student[a:b].to(dtype), teacher[a:b].to(dtype)
        ii, x, mask = _grkd_tile(zs, zt, None if top_idx is None else top_idx[a:b], i0, i1, temperature)
        if dtype == torch.float64:  # softplus is the identity above the threshold
            dsp = torch.where(x > _SOFTPLUS_THRESHOLD, 1.0, x.sigmoid())
        else:  # fp32: sigmoid(x) rounds to exactly 1 for x > 20 (1 - 2e-9), no select needed
            dsp = x.sigmoid_()
        if ignore_mask is not None:  # dropped rows are selected out (NaN there must not leak)
            mask &= keep[a:b, None, None]
        # dL/dz_j per pair (dL/dz_i = -pg)
        pg = torch.where(mask, dsp.mul_(weight[a:b, None, None]), 0.0)
        gs[a:b] += pg.sum(1)
        if ii is None:
            gs[a:b, i0:i1] -= pg.sum(2)
        else:
            gs[a:b].scatter_add_(1, ii, -pg.sum(2))
    return gs.to(student.dtype)
