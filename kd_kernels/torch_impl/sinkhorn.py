"""Memory-efficient PyTorch path for the optimal-transport family, with hand-written backwards.

Two entry points per op (plain functions on tensors; no autograd inside, no host syncs):

* SinKD (docs/sinkhorn.md §1-3): :func:`sinkhorn_loss_fwd` / :func:`sinkhorn_loss_bwd`.
* Batched log-domain Sinkhorn (docs/sinkhorn.md §4-6): :func:`sinkhorn_fwd` / :func:`sinkhorn_bwd`.

fp16/bf16 inputs are computed in float32, float64 stays float64; results are cast back to
the input dtypes. These functions are the blueprint for the GPU kernels.

The derivations (the scaling-vector form of the plain-domain iteration, both reverse
recurrences, what is saved, zero marginals) are in docs/sinkhorn.md; the comment block above
each pair of functions summarises the formulas the code follows.
"""

from __future__ import annotations

import torch

__all__ = ["sinkhorn_bwd", "sinkhorn_fwd", "sinkhorn_loss_bwd", "sinkhorn_loss_fwd"]

# Elements in one [rows, B, classes] tile of the L1 cdist and its backward: 4M (16 MiB in
# fp32) is large enough that the Python loop over tiles costs nothing next to the tile math,
# small enough that no B x B x C buffer is ever formed when C is a vocabulary.
TILE_ELEMS = 1 << 22


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (fp16/bf16 accumulate in float32)."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _tiles(rows: int, cols: int, classes: int):
    """Yield (row slice, class slice) tiles with rows_tile * cols * classes_tile <= TILE_ELEMS."""
    r_step = max(1, min(rows, TILE_ELEMS // max(cols, 1)))
    c_step = max(1, min(classes, TILE_ELEMS // max(r_step * cols, 1)))
    for r0 in range(0, rows, r_step):
        for c0 in range(0, classes, c_step):
            yield slice(r0, r0 + r_step), slice(c0, c0 + c_step)


# ---------------------------------------------------------------------------------------
# SinKD
#
# Forward (z_s, z_t: [B, C] logits; T temperature; eps; L = n_iters):
#   p = softmax(z_s / T), q = softmax(z_t / T)                                  [B, C]
#   D_ij = sum_c |p_ic - q_jc|              (L1 cdist, tiled over rows and classes)
#   K = exp(-D / eps)
#   The reference's plain-domain iteration X_0 = K, Y_l = diag(r_l)^-1 X_{l-1} (r_l row sums),
#   X_l = Y_l diag(c_l)^-1 (c_l column sums) keeps X_l = diag(u_l) K diag(v_l) with
#       u_0 = v_0 = 1,  u_l = 1 / (K v_{l-1}),  v_l = 1 / (K^T u_l),
#   so Y_l = diag(u_l) K diag(v_{l-1}), r_l = u_{l-1} / u_l and c_l = v_{l-1} / v_l.
#   Loss = sum_ij P_ij D_ij = u_L^T (K o D) v_L.  Saved: D [B, B] and U, V [L + 1, B].
#
# Backward (g = dLoss; docs/sinkhorn.md §2, the exact gradient of the unrolled iterations):
#   G = g D (dL/dP),  dD = g P.
#   for l = L..1:  (column step, then row step)
#       s_j = sum_i G_ij X_l,ij          G_Y = (G - 1 s^T) diag(1 / c_l)
#       t_i = sum_j G_Y,ij Y_l,ij        G   = diag(1 / r_l) (G_Y - t 1^T)
#   dD += G o (-K / eps)
#   dp_ic = sum_j dD_ij sign(p_ic - q_jc),  dq_jc = -sum_i dD_ij sign(p_ic - q_jc)  (sign(0) = 0)
#   dz_s = p o (dp - <dp, p>_row) / T, likewise dz_t.
# ---------------------------------------------------------------------------------------


def _softmax_rows(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.softmax(logits.to(dtype) / temperature, dim=1).contiguous()


def _l1_cdist(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """D_ij = sum_c |p_ic - q_jc| without a [B, B, C] buffer."""
    if p.device.type == "cpu":  # ATen's CPU L1 cdist: one vectorised pass per pair, no [B, B, C] buffer
        return torch.ops.aten._cdist_forward(p, q, 1.0, None)
    out = p.new_zeros(p.shape[0], q.shape[0])
    for rows, cls in _tiles(p.shape[0], q.shape[0], p.shape[1]):
        out[rows] += (p[rows, None, cls] - q[None, :, cls]).abs_().sum(-1)
    return out


def _l1_cdist_bwd(grad: torch.Tensor, p: torch.Tensor, q: torch.Tensor, need_p: bool, need_q: bool):
    """Gradients of sum_ij grad_ij D_ij w.r.t. p and q (None when not needed)."""
    if p.device.type == "cpu":  # ATen's CPU L1 backward: no [B, B, C] buffer, one pass per side
        empty = p.new_zeros(p.shape[0], q.shape[0])  # the distances: not read by ATen for p = 1
        gp = torch.ops.aten._cdist_backward(grad.contiguous(), p, q, 1.0, empty) if need_p else None
        gq = torch.ops.aten._cdist_backward(grad.T.contiguous(), q, p, 1.0, empty.T) if need_q else None
        return gp, gq
    gp = torch.zeros_like(p) if need_p else None
    gq = torch.zeros_like(q) if need_q else None
    for rows, cls in _tiles(p.shape[0], q.shape[0], p.shape[1]):
        sign = (p[rows, None, cls] - q[None, :, cls]).sign_()  # [rows, B, classes]
        if gp is not None:
            gp[rows, cls] = torch.einsum("ij,ijc->ic", grad[rows], sign)
        if gq is not None:
            gq[:, cls] -= torch.einsum("ij,ijc->jc", grad[rows], sign)
    return gp, gq


def _softmax_bwd(gp: torch.Tensor, p: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    return (p * (gp - (gp * p).sum(1, keepdim=True)) / temperature).to(dtype)


def sinkhorn_loss_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    epsilon: float,
    n_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SinKD forward. Returns (loss in the student's dtype, D [B, B], U [L+1, B], V [L+1, B])."""
    dt = _compute_dtype(student, teacher)
    p = _softmax_rows(student, temperature, dt)
    q = _softmax_rows(teacher, temperature, dt)
    cost = _l1_cdist(p, q)
    kernel = torch.exp(cost / -epsilon)
    nb = cost.shape[0]
    u = cost.new_ones(n_iters + 1, nb)
    v = cost.new_ones(n_iters + 1, nb)
    us, vs, kt = u.unbind(0), v.unbind(0), kernel.T  # views, taken once: two small ops per half-step
    for it in range(1, n_iters + 1):
        torch.mv(kernel, vs[it - 1], out=us[it]).reciprocal_()
        torch.mv(kt, us[it], out=vs[it]).reciprocal_()
    loss = torch.dot(torch.mv(kernel * cost, vs[n_iters]), us[n_iters])
    return loss.to(student.dtype), cost, u, v


def sinkhorn_loss_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    cost: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    temperature: float,
    epsilon: float,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SinKD backward: (grad_student | None, grad_teacher | None) in the inputs' dtypes."""
    dt = cost.dtype
    g = grad.to(dt)
    kernel = torch.exp(cost / -epsilon)
    n_iters = u.shape[0] - 1
    uv = torch.outer(u[n_iters], v[n_iters]).mul_(g)
    g_cost = uv * kernel  # direct term g P
    # With M = G o K, X = diag(u_l) K diag(v_l), Y = diag(u_l) K diag(v_{l-1}), r = u_l / u_{l-1},
    # c = v_l / v_{l-1}:  s = v_l o (M^T u_l),  t = u_l o (M v_l - K (s o v_l)),
    #   G <- diag(r) (G diag(c) - 1 (s o c)^T - t 1^T)
    # (the two steps above, with X and Y never formed). Carried as H_l = diag(u_l) G_l diag(v_l)
    # (H o K = G o X_l: plan-scaled, finite wherever K is), the step needs no rescaling of G:
    #   N = H o K,  s = N^T 1,  w = s o v_l,  z = u_l o t = u_l o (N 1 - u_l o (K w)),
    #   H <- H - u_l w^T - z v_{l-1}^T        (u_0 = v_0 = 1, so H_0 = G_0)
    # ten small ops per iteration (three B x B passes, one matrix-vector product, one rank-2 update).
    h = uv.mul_(cost)  # H_L = diag(u_L) (g D) diag(v_L)
    us, vs = u.unbind(0), v.unbind(0)
    for it in range(n_iters, 0, -1):
        ui, vi = us[it], vs[it]
        nk = h * kernel
        w = nk.sum(0).mul_(vi)
        z = torch.addcmul(nk.sum(1), ui, torch.mv(kernel, w), value=-1).mul_(ui)
        h.addr_(ui, w, alpha=-1).addr_(z, vs[it - 1], alpha=-1)
    g_cost -= h.mul_(kernel).div_(epsilon)
    p = _softmax_rows(student, temperature, dt)
    q = _softmax_rows(teacher, temperature, dt)
    gp, gq = _l1_cdist_bwd(g_cost, p, q, need_student, need_teacher)
    gs = _softmax_bwd(gp, p, temperature, student.dtype) if need_student else None
    gt = _softmax_bwd(gq, q, temperature, teacher.dtype) if need_teacher else None
    return gs, gt


# ---------------------------------------------------------------------------------------
# Batched log-domain Sinkhorn
#
# Forward (C: [B, n, m] cost, a [B, n], b [B, m] positive marginals, eps, L = n_iters), in
# potentials scaled by 1/eps (alpha = f / eps, beta = g / eps) with M = -C / eps:
#   beta_0 = 0
#   alpha_k = log a - LSE_j(M_ij + beta_{k-1,j})          k = 1..L
#   beta_k  = log b - LSE_i(M_ij + alpha_k,i)
#   P = exp(M + alpha_L 1^T + 1 beta_L^T)
# Convergence check (tol > 0, docs/sinkhorn.md §5): after iteration k with k % check_every == 0
# and k < L, a problem's row-marginal error err = sum_i |sum_j P^(k)_ij - a_i| (the columns are
# exact after the beta update) is compared with tol; at err <= tol the problem is frozen (its
# potentials no longer change) and n_run = k. Every problem runs in the same fixed loop (no host
# sync): a frozen problem's updates are discarded with torch.where.
# Saved: unrolled: alpha_1..L [L, B, n], beta_1..L [L, B, m] (rows past n_run repeat the last
# potentials); implicit: the final potentials only, [1, B, n] and [1, B, m].
#
# Backward (dP given): W = dP o P; dM = W; abar = W 1 (dL/dalpha_L); bbar = W^T 1 (dL/dbeta_L).
#   for k = L..1 (problem b takes the steps k <= n_run[b] only; the others are identities):
#       Qb = exp(M + alpha_k 1^T + 1 (beta_k - log b)^T)    (softmax over i: the beta_k step)
#       abar -= Qb bbar;           dM -= Qb diag(bbar);    dlog b += bbar
#       Qa = exp(M + (alpha_k - log a) 1^T + 1 beta_{k-1}^T) (softmax over j: the alpha_k step)
#       bbar = -Qa^T abar;         dM -= diag(abar) Qa;    dlog a += abar;   abar = 0
#   dC = -dM / eps,  da = dlog a / a,  db = dlog b / b.
# Implicit (grad="implicit", docs/sinkhorn.md §6): the same n_run steps with every alpha_k,
# beta_k and beta_{k-1} replaced by the final potentials: the adjoint fixed-point iteration of
# the converged map, whose limit is the implicit-function gradient of the fixed point. Qa and
# Qb are then the same in every step: they are formed once, each step is two batched
# matrix-vector products, and dM gets Qb diag(sum of bbar) + diag(sum of abar) Qa at the end.
# Memory: M, dM and one [B, n, m] temporary (two for implicit), plus the saved potentials,
# where autograd through the reference loop keeps O(L) [B, n, m] buffers.
# ---------------------------------------------------------------------------------------


def _row_error(neg: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per problem sum_i |sum_j exp(M_ij + alpha_i + beta_j) - a_i| ([B]; NaN stays NaN)."""
    rows = torch.logsumexp(neg + beta[:, None, :], dim=2).add_(alpha).exp_()
    return (rows - a).abs_().sum(1)


def sinkhorn_fwd(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: float,
    n_iters: int,
    tol: float = 0.0,
    check_every: int = 1,
    implicit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn on [B, n, m] costs.

    Returns (plan in cost's dtype, alphas [S, B, n], betas [S, B, m], n_run [B] int32) with
    S = n_iters (unrolled) or 1 (``implicit``: the final potentials only). ``tol <= 0``: no check.
    """
    dt = _compute_dtype(cost, a, b)
    neg = (cost.to(dt) / -epsilon).contiguous()  # the plan is returned contiguous
    a_c = a.to(dt)
    log_a = torch.log(a_c)
    log_b = torch.log(b.to(dt))
    nb, n, m = cost.shape
    saved = 1 if implicit else n_iters
    alphas = neg.new_empty(saved, nb, n)
    betas = neg.new_empty(saved, nb, m)
    beta = neg.new_zeros(nb, m)
    alpha = neg.new_zeros(nb, n)
    n_run = torch.full((nb,), n_iters, dtype=torch.int32, device=cost.device)
    checking = tol > 0
    active = torch.ones(nb, 1, dtype=torch.bool, device=cost.device) if checking else None
    for k in range(n_iters):
        alpha_new = log_a - torch.logsumexp(neg + beta[:, None, :], dim=2)
        if checking:
            alpha = torch.where(active, alpha_new, alpha)
            beta = torch.where(active, log_b - torch.logsumexp(neg + alpha[:, :, None], dim=1), beta)
        else:
            alpha = alpha_new
            beta = log_b - torch.logsumexp(neg + alpha[:, :, None], dim=1)
        slot = 0 if implicit else k
        alphas[slot] = alpha
        betas[slot] = beta
        done = k + 1
        if checking and done % check_every == 0 and done < n_iters:
            newly = active[:, 0] & (_row_error(neg, alpha, beta, a_c) <= tol)
            n_run = torch.where(newly, done, n_run)
            active = active & ~newly[:, None]
    plan = neg.add_(alpha[:, :, None]).add_(beta[:, None, :]).exp_()
    return plan.to(cost.dtype), alphas, betas, n_run


def _minus_log(potential: torch.Tensor, log_marginal: torch.Tensor, marginal: torch.Tensor) -> torch.Tensor:
    """potential - log(marginal) = -LSE(...), finite; -inf (not (-inf) - (-inf) = NaN) where the marginal is 0.

    A zero-mass row (column) has potential -inf and a zero adjoint in every step, so its
    softmax term must be exactly 0: the -inf gives that, and keeps NaN out of the cost gradient.
    """
    return torch.where(marginal > 0, potential - log_marginal, float("-inf"))


def sinkhorn_bwd(
    grad: torch.Tensor,
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    alphas: torch.Tensor,
    betas: torch.Tensor,
    n_run: torch.Tensor,
    epsilon: float,
    n_iters: int,
    implicit: bool,
    need_cost: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Reverse recurrence of :func:`sinkhorn_fwd`: (grad_cost, grad_a, grad_b), None where not needed."""
    dt = alphas.dtype
    neg = cost.to(dt) / -epsilon
    a_c = a.to(dt)
    b_c = b.to(dt)
    log_a = torch.log(a_c)
    log_b = torch.log(b_c)
    g_neg = torch.exp(neg + alphas[-1][:, :, None] + betas[-1][:, None, :]).mul_(grad.to(dt))  # W = dP o P
    abar_out = g_neg.sum(2)  # alpha_L also feeds P directly
    bbar = g_neg.sum(1)
    g_log_a = torch.zeros_like(abar_out)
    g_log_b = torch.zeros_like(bbar)
    # A problem takes step k only when k < n_run; the direct term abar_out enters at its last step.
    if implicit:
        alpha, beta = alphas[0], betas[0]
        qb = torch.exp(neg + alpha[:, :, None] + _minus_log(beta, log_b, b_c)[:, None, :])
        qa = torch.exp(neg + _minus_log(alpha, log_a, a_c)[:, :, None] + beta[:, None, :])
        pending = abar_out
        for k in range(n_iters - 1, -1, -1):
            take = (k < n_run)[:, None]
            abar = torch.where(take, pending - torch.bmm(qb, bbar[:, :, None])[:, :, 0], 0.0)
            pending = torch.where(take, 0.0, pending)
            g_log_b += torch.where(take, bbar, 0.0)
            g_log_a += abar
            bbar = torch.where(take, -torch.bmm(abar[:, None, :], qa)[:, 0, :], bbar)
        # sum over steps of bbar (resp. abar) = g_log_b (resp. g_log_a): dM -= Qb diag(.) + diag(.) Qa
        g_neg -= qb.mul_(g_log_b[:, None, :]).add_(qa.mul_(g_log_a[:, :, None]))
    else:
        pending = abar_out
        for k in range(n_iters - 1, -1, -1):
            take = (k < n_run)[:, None]
            # beta_k = log b - LSE_i(M + alpha_k)
            shift = _minus_log(betas[k], log_b, b_c)
            bb = torch.where(take, bbar, 0.0)
            q = torch.exp(neg + alphas[k][:, :, None] + shift[:, None, :]).mul_(bb[:, None, :])
            abar = torch.where(take, pending - q.sum(2), 0.0)
            pending = torch.where(take, 0.0, pending)
            g_neg -= q
            g_log_b += bb
            # alpha_k = log a - LSE_j(M + beta_{k-1}), beta_{-1} = 0
            beta_prev = betas[k - 1] if k > 0 else torch.zeros_like(bbar)
            shift = _minus_log(alphas[k], log_a, a_c)
            q = torch.exp(neg + shift[:, :, None] + beta_prev[:, None, :]).mul_(abar[:, :, None])
            bbar = torch.where(take, -q.sum(1), bbar)
            g_neg -= q
            g_log_a += abar
    g_cost = (g_neg / -epsilon).to(cost.dtype) if need_cost else None
    g_a = (g_log_a / a_c).to(a.dtype) if need_a else None
    g_b = (g_log_b / b_c).to(b.dtype) if need_b else None
    return g_cost, g_a, g_b
