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


def _dist_probs(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both softmaxes in one call: ``(x, y)`` with ``x = [z_s; z_t]/τ`` and ``y = softmax(x)``,
    both ``[2, rows, C]`` in ``dtype`` (index 0 the student, 1 the teacher).

    Stacking halves the number of ATen calls of everything that follows; at typical DIST
    shapes (N·C ~ 1e4-1e5) the calls, not the arithmetic, dominate on CPU.
    """
    x = torch.stack((student.to(dtype), teacher.to(dtype)))
    if temperature != 1.0:
        x.div_(temperature)
    return x, torch.softmax(x, dim=2)


def _pearson_coeffs(n: torch.Tensor, m: torch.Tensor, s: torch.Tensor, scale, need_a: bool, need_b: bool):
    """Coefficients of ``scale · ∂r/∂a = scale (b̂/q - s m/(n q²) â)`` for r = s/(nm + eps),
    q = nm + eps: returns ``(scale/q, scale·s m/(n q²), scale·s n/(m q²))`` (the partner's,
    the own one for a, the own one for b; None where not needed). ``s/n`` is taken first: it
    is bounded by m (Cauchy-Schwarz) and exactly 0 when n = 0, as torch's norm backward gives."""
    tiny = torch.finfo(n.dtype).tiny
    inv_q = (n * m + DIST_EPS).reciprocal_()
    partner = inv_q * scale
    s_q2 = s * inv_q * partner  # scale · s / q²
    own_a = (s_q2 / n.clamp_min(tiny)).mul_(m) if need_a else None
    own_b = (s_q2 / m.clamp_min(tiny)).mul_(n) if need_b else None
    return partner, own_a, own_b


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
    """Forward of DIST. Returns ``(loss [], lse_s [N], lse_t [N], class_stats [5, C])``.

    When all rows fit in one chunk (the usual case: N·C <= CHUNK_ELEMENTS) the class
    statistics come straight from that chunk; otherwise the chunk statistics are merged with
    Chan's update. Without a mask the row count is the Python int N (no count tensors).
    """
    n_rows, c = student.shape
    dtype = compute_dtype(student, teacher)
    dev = student.device
    masked = ignore_mask is not None  # without a mask every w is 1: skip the selects
    keep = _keep_rows(ignore_mask, n_rows, dev) if masked else None
    lse_s = torch.empty(n_rows, dtype=dtype, device=dev)
    lse_t = torch.empty_like(lse_s)
    step = chunk_rows_for(c, chunk_rows)
    if n_rows == 0:  # no chunk: zero statistics (the loss is 0 through [K > 0])
        mu = m2 = torch.zeros(2, c, dtype=dtype, device=dev)
        c_st, count, inter_sum = m2[0], m2.new_zeros(()), m2.new_zeros(())
    for a in range(0, n_rows, step):
        b = min(a + step, n_rows)
        x, y = _dist_probs(student[a:b], teacher[a:b], temperature, dtype)
        # lse = max + log S, and the largest probability is exp(max - lse) = 1/S
        lse = x.amax(2).sub_(y.amax(2).log_())
        lse_s[a:b], lse_t[a:b] = lse[0], lse[1]
        if masked:
            kept = keep[a:b]
            y = torch.where(kept[:, None], y, 0.0)
            w = kept.to(dtype)
            nb = w.sum()
        else:
            nb = b - a
        # row statistics, centred in x's buffer (x is not needed any more)
        ra = torch.sub(y, 1.0 / c, out=x)
        nm = torch.linalg.vector_norm(ra, dim=2)
        s = ra[0].mul_(ra[1]).sum(1)  # <â, b̂> (â is not needed any more)
        r = s / (nm[0] * nm[1] + DIST_EPS)
        r_sum = torch.dot(w, r) if masked else r.sum()
        # chunk-local class moments over the kept rows, centred in x's buffer again
        mean_b = (y.sum(1) / nb.clamp_min(1)) if masked else y.mean(1)  # [2, C]
        d = torch.sub(y, mean_b[:, None, :], out=x)
        if masked:
            d.mul_(w[:, None])
        c_b = torch.mul(d[0], d[1], out=y[0]).sum(0)  # y is not needed any more either
        m2_b = d.square_().sum(1)
        if a == 0:  # the first (usually the only) chunk: its statistics as they are
            mu, m2, c_st, count, inter_sum = mean_b, m2_b, c_b, nb, r_sum
            continue
        inter_sum = inter_sum + r_sum
        # Chan's pairwise merge of (count, mean, M2, C) with this chunk's
        total = count + nb
        frac_b = nb / total.clamp_min(1) if masked else nb / total
        cross = count * frac_b  # n_a n_b / (n_a + n_b)
        delta = mean_b - mu
        mu = mu + delta * frac_b
        m2 = m2 + m2_b + delta * delta * cross
        c_st = c_st + c_b + delta[0] * delta[1] * cross
        count = total
    norms = m2.clamp_min(0).sqrt_()
    t2 = temperature**2
    intra_sum = (c_st / (norms[0] * norms[1] + DIST_EPS)).sum()
    # L = τ² (β (1 - Σ w r / K) + γ (1 - Σ_c r_c / C)) · [K > 0]
    if masked:
        inter = 1.0 - inter_sum / count.clamp_min(1)
        loss = t2 * (inter_weight * inter + intra_weight * (1.0 - intra_sum / c)) * (count > 0).to(dtype)
    else:
        k = max(n_rows, 1)
        loss = torch.add(inter_sum * (-t2 * inter_weight / k), intra_sum, alpha=-t2 * intra_weight / c)
        loss = loss.add_(t2 * (inter_weight + intra_weight)).mul_(float(n_rows > 0))
    return loss, lse_s, lse_t, torch.cat((mu, norms, c_st[None]))


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
    """Backward of :func:`dist_fwd` given the scalar ``grad``; returns (grad_s, grad_t).

    The probabilities are recomputed with the forward's own softmax (``lse_s``/``lse_t`` are
    not needed). Per side, with the partner's centred values b̂ (row) and cb (class) and the
    coefficients of :func:`_pearson_coeffs` (scale and the softmax Jacobian's 1/τ folded in):
    ``g = α_r b̂ - β_r â + α_c cb - β_c ca`` and ``dz = y ⊙ (g - <g, y>)``.
    """
    n_rows, c = student.shape
    dtype = compute_dtype(student, teacher)
    masked = ignore_mask is not None  # without a mask every w is 1: skip the selects
    g0 = grad.to(dtype) * -temperature  # -τ² grad / τ
    if masked:
        keep = _keep_rows(ignore_mask, n_rows, student.device)
        count = keep.sum().to(dtype)
        g0 = g0 * (count > 0).to(dtype)
        row_scale = g0 * inter_weight / count.clamp_min(1)
    else:
        row_scale = g0 * (inter_weight / max(n_rows, 1))
    col_scale = g0 * (intra_weight / c)
    stats = class_stats.to(dtype)
    mu = stats[:2]
    col_ab, col_a, col_b = _pearson_coeffs(stats[2], stats[3], stats[4], col_scale, need_student, need_teacher)
    step = chunk_rows_for(c, chunk_rows)
    single = 0 < n_rows <= step
    # one chunk: the outputs are the chunk results themselves (no [N, C] buffer and copy)
    gs_out = student.new_empty(0) if single or not need_student else torch.empty_like(student)
    gt_out = teacher.new_empty(0) if single or not need_teacher else torch.empty_like(teacher)
    for a in range(0, n_rows, step):
        b = min(a + step, n_rows)
        x, y = _dist_probs(student[a:b], teacher[a:b], temperature, dtype)
        if masked:
            kept = keep[a:b, None]
            y = torch.where(kept, y, 0.0)
        ra = torch.sub(y, 1.0 / c, out=x)  # â, b̂ in x's buffer
        nm = torch.linalg.vector_norm(ra, dim=2)
        s = torch.linalg.vecdot(ra[0], ra[1])
        row_ab, row_a, row_b = _pearson_coeffs(nm[0], nm[1], s, row_scale, need_student, need_teacher)
        ca = y - mu[:, None, :]
        if masked:
            ca.mul_(kept.to(dtype))
        for side, need, row_own, col_own, out in (
            (0, need_student, row_a, col_a, gs_out),
            (1, need_teacher, row_b, col_b, gt_out),
        ):
            if not need:
                continue
            other = 1 - side
            g = ra[other] * row_ab[:, None]
            g.addcmul_(ra[side], row_own[:, None], value=-1.0)
            g.addcmul_(ca[other], col_ab)
            g.addcmul_(ca[side], col_own, value=-1.0)
            yo = y[side]
            dz = g.sub_(torch.linalg.vecdot(g, yo)[:, None]).mul_(yo)
            if masked:
                dz = torch.where(kept, dz, 0.0)
            if single:  # the only chunk: no copy (beyond a cast to the input's dtype)
                out = dz.to(out.dtype)
                gs_out, gt_out = (out, gt_out) if side == 0 else (gs_out, out)
            else:
                out[a:b] = dz
    return gs_out, gt_out


# ---------------------------------------------------------------------------------------
# GRKD (docs/logit.md §9)
#
# Per row, pairs P = {(i, j): t_i > t_j} (teacher logits, ties excluded; with top_k, i must
# be among the teacher's top k classes), x_ij = -(z_s,i - z_s,j)/τ:
#   row = Σ_P softplus(x_ij) / max(|P|, 1);   L = Σ_kept row / max(K, 1)
#   dL/dz_s,i -= w σ(x_ij)/τ,  dL/dz_s,j += w σ(x_ij)/τ  over P, w = 1/(max(|P|,1) max(K,1))
# (in float64 σ is replaced by 1 above the softplus threshold 20, as torch's softplus
# backward does; in float32 σ rounds to 1 there anyway.)
# The loss is piecewise constant in the teacher: the teacher gets no gradient.
# Tiles: [rows, i-block, C] with rows·i-block·C <= PAIR_TILE_ELEMENTS; the first classes i
# are either a block of 0..C-1 or a block of the top-k indices (gathered).
#
# The pair selection is arithmetic, not a select: the float pair mask M (1 on P) becomes
# ±inf and x' = minimum(x, ±inf) is x on P and -inf elsewhere; then
# softplus(x') = relu(x') - log σ(|x'|) and σ(x') are exactly 0 off P. On CPU every op used
# here is vectorised, whereas torch.where/masked_fill/softplus/fmin on a [rows, bi, C] tile
# are element loops (about 10-40x slower). So that no difference is NaN, the student enters
# as nan_to_num(z/τ, nan=0, posinf=0, neginf=-max): NaN or +inf student logits make the row
# NaN through a carrier term (as NaN teacher logits do); a -inf student logit gives pair terms
# of 0 (below the partner) or about max, and a row sum >= max is read as +inf (forward KL's
# rule: probability 0 where the teacher ranks the class higher); two -inf student logits
# form a pair of difference 0 (softplus = log 2), the limit of equal rates.
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


def _grkd_tile(zs, zt, top_idx, i0, i1, temperature, need_count: bool = False):
    """One tile of a row chunk: ``(ii, x, count)``.

    ``ii`` the first-class ids (None = the range i0:i1); ``x [rows, bi, C]`` = -(z_i - z_j)/τ
    on the pairs t_i > t_j and -inf off them; ``count [rows]`` the number of pairs in the tile
    (float, exact: at most PAIR_TILE_ELEMENTS per row) when ``need_count``.
    Student logits enter as ``nan_to_num(z/τ, nan=0, posinf=0, neginf=-max)`` so that no
    difference is NaN (the callers carry NaN/+inf rows separately and map sums >= max to inf).
    """
    if temperature != 1.0:  # divide the [rows, C] operands, not the [rows, bi, C] pair tile
        zs = zs / temperature
    big = torch.finfo(zs.dtype).max
    zs = torch.nan_to_num(zs, nan=0.0, posinf=0.0, neginf=-big)
    if top_idx is None:
        ii = None
        si, ti = zs[:, i0:i1], zt[:, i0:i1]
    else:
        ii = top_idx[:, i0:i1]
        si, ti = zs.gather(1, ii), zt.gather(1, ii)
    x = zs[:, None, :] - si[:, :, None]  # -(z_i - z_j)/τ, [rows, bi, C]: never NaN
    pair = torch.empty_like(x)
    torch.gt(ti[:, :, None], zt[:, None, :], out=pair)  # 1.0 on pairs (False for NaN)
    count = pair.sum((1, 2)) if need_count else None
    torch.minimum(x, pair.sub_(0.5).mul_(math.inf), out=x)  # x on pairs, -inf elsewhere
    return ii, x, count


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
        _, x, count = _grkd_tile(zs, zt, None if top_idx is None else top_idx[a:b], i0, i1, temperature, True)
        # softplus(x) = relu(x) - log σ(|x|): 0 at x = -inf, inf at x = +inf
        log_sig = x.abs().sigmoid_().log_()
        row_sum[a:b] += x.relu_().sum((1, 2)) - log_sig.sum((1, 2))
        pairs[a:b] += count.to(torch.int64)
        if i0 == 0:  # NaN carriers: a NaN/+inf logit makes the row NaN (-inf classes keep amax finite)
            row_sum[a:b] += (zt.amax(1) + zs.amax(1)) * 0.0
    # a pair term of about +max (a -inf student logit above its partner, see _grkd_tile) is +inf
    row_sum = torch.where(row_sum >= torch.finfo(dtype).max, math.inf, row_sum)
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
    """Backward of :func:`grkd_fwd` (student only).

    Per tile only the pair sums Σ_i σ(x_ij) (for z_j) and Σ_j σ(x_ij) (for z_i) are formed;
    the per-row weight (0 on dropped rows) is applied once to the ``[N, C]`` result.
    """
    n_rows, c = student.shape
    dtype = compute_dtype(student, teacher)
    top_idx = _grkd_top_idx(teacher, top_k)
    weight = grad.to(dtype) / (pair_count.clamp_min(1).to(dtype) * temperature)
    if ignore_mask is None:
        weight = weight / max(n_rows, 1)
    else:  # σ off the pairs is exactly 0 and always finite: zeroing the weight drops the row
        keep = _keep_rows(ignore_mask, n_rows, student.device)
        weight = torch.where(keep, weight / keep.sum().clamp_min(1).to(dtype), 0.0)
    gs = torch.zeros(n_rows, c, dtype=dtype, device=student.device)
    for a, b, i0, i1 in _grkd_tiles(n_rows, c, top_k, tile_elements):
        zs, zt = student[a:b].to(dtype), teacher[a:b].to(dtype)
        ii, x, _ = _grkd_tile(zs, zt, None if top_idx is None else top_idx[a:b], i0, i1, temperature)
        if dtype == torch.float64:  # softplus is the identity above the threshold
            dsp = torch.where(x > _SOFTPLUS_THRESHOLD, 1.0, x.sigmoid())
        else:  # fp32: sigmoid(x) rounds to exactly 1 for x > 20 (1 - 2e-9), no select needed
            dsp = x.sigmoid_()
        # dL/dz_j per pair (dL/dz_i = -pg), before the row weight
        gs[a:b] += dsp.sum(1)
        if ii is None:
            gs[a:b, i0:i1] -= dsp.sum(2)
        else:
            gs[a:b].scatter_add_(1, ii, -dsp.sum(2))
    return gs.mul_(weight[:, None]).to(student.dtype)
