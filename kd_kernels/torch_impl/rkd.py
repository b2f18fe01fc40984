"""RKD distance and angle losses on the memory-efficient PyTorch path, with hand-written
forward and backward functions (no autograd inside). This is the CPU kernel, the GPU fallback,
and the blueprint for the Triton and CUDA kernels, which have the same signatures.

The math (forward, backward, and the near-duplicate rule) is derived in ``docs/rkd.md``; the
section numbers below refer to it. Implementation notes:

* Inputs are computed in float32 (float64 if student or teacher is float64, with the same
  rule); results are cast to the student's dtype, gradients to each input's dtype.
* Squared distances come from the Gram route on the column-centred rows (§1), in row blocks of
  about 8M entries ([B, N] with B = 2^23 // N rows, 32 MB in fp32), recomputed in every pass
  instead of stored: distance forward = pass 1 (sum of d for mu) + pass 2 (loss); backward =
  one pass. No N x N buffer unless reduction="none". When one block covers all rows (N^2 <=
  2^23, N <= 2896: the buffers are at most 32 MB each) the distance loss takes the dense route
  instead: each distance matrix is computed once per call, and the backward forms
  A = (h' Gamma - 2 c / M) / d directly (c is known before the Laplacian), one GEMM per side. The angle loss keeps one [N, N] E buffer
  per network and runs over anchors in chunks of about 16M entries ([B, N, N] with
  B = 2^24 // N^2, 64 MB in fp32): no N x N x D and no N x N x N buffer.
* Near-duplicate pairs (§4: E^gram_ij < 2^-6 (s_i + s_j)) are found per row block with
  ``torch.nonzero`` on the block's near mask, and their E recomputed from explicit differences
  of the original (uncentred) rows, in chunks of about 2^24 elements. On CPU tensors this costs
  nothing; on CUDA tensors this path syncs with the host once per row block for it (and once
  per call for the list of near anchors of the angle loss). The Triton and CUDA C++ kernels do
  not sync. In data that is not collapsed the pair lists are empty or tiny, so the common case
  costs one comparison per entry.
* Distance backward: near pairs are left out of the Laplacian GEMM and added explicitly,
  ``dx_i += A_ij (x_i - x_j)`` with differences of the original rows (``index_add_``).
* Angle: near anchors (near in the student or the teacher) are masked out of the E route
  (their v's are set to 0, so they contribute 0 there) and computed by the explicit route, in
  chunks of about 2^24 elements of [B, N, D] (each chunk's [B, N, N] psi is bounded by the
  same budget). All other anchors take the E route with no clamp of psi and no floor: a zero
  entry of E (rows exactly equal) gives v = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["compute_dtype", "rkd_angle_bwd", "rkd_angle_fwd", "rkd_distance_bwd", "rkd_distance_fwd"]

# The reference's clamp on squared distances (pdist) and F.normalize's eps on norms.
_EPS = 1e-12
# Near-duplicate threshold of docs/rkd.md §4: E^gram < TAU (s_i + s_j). Above it the Gram
# route resolves the distance to ~1e-5 relative in fp32; below it E is recomputed explicitly.
_TAU = 2.0**-6
# Distance row block: B = 2^23 // N rows, so each [B, N] fp32 temporary is 32 MB and the ~10
# live ones stay well inside the 1.5 GB budget at N = 16384 while the GEMMs stay large.
_DIST_BLOCK_ELEMS = 1 << 23
# Angle anchor chunk: B = 2^24 // N^2 anchors, 64 MB per [B, N, N] fp32 temporary (~5 live).
_ANGLE_CHUNK_ELEMS = 1 << 24
# Explicit differences (near pairs, near anchors): about 2^24 elements (64 MB fp32) per
# [P, D] or [B, N, D] temporary, the same budget as the angle chunks.
_EXPLICIT_ELEMS = 1 << 24


def compute_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """float64 if either input is float64, else float32 (the dtype of the saved mu's too)."""
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original rows in ``dtype``, centred copy X~, s = |x~_i|^2 [N])."""
    xf = x.to(dtype)
    xc = xf - xf.mean(0)
    return xf, xc, (xc * xc).sum(1)


def _explicit_sqdist(xf: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """sum_k (x_ik - x_jk)^2 for the index pairs (rows[p], cols[p]) of the original rows."""
    out = xf.new_empty(rows.shape[0])
    step = max(1, _EXPLICIT_ELEMS // max(1, xf.shape[1]))
    for p0 in range(0, rows.shape[0], step):
        diff = xf[rows[p0 : p0 + step]] - xf[cols[p0 : p0 + step]]
        out[p0 : p0 + step] = diff.mul_(diff).sum(1)
    return out


def _sqdist_block(xf: torch.Tensor, xc: torch.Tensor, sq: torch.Tensor, r0: int, r1: int):
    """Rows r0:r1 of E [B, N] (§1 for far pairs, explicit differences for near pairs, 0 on the
    diagonal) and the near pairs (block row indices, column indices)."""
    ssum = sq[r0:r1, None] + sq[None, :]
    e = torch.addmm(ssum, xc[r0:r1], xc.T, alpha=-2)
    near = e < ssum.mul_(_TAU)
    near.diagonal(offset=r0).fill_(False)
    bi, cj = near.nonzero(as_tuple=True)  # host sync on CUDA tensors (see the module docstring)
    if bi.numel():
        e[bi, cj] = _explicit_sqdist(xf, bi + r0, cj)
    e.diagonal(offset=r0).zero_()
    return e, bi, cj


# ---------------------------------------------------------------------------------------------
# Distance loss (docs/rkd.md §2, §4)
# ---------------------------------------------------------------------------------------------


def _dist_block(side: tuple, r0: int, r1: int, need_active: bool = True):
    """Rows r0:r1 of the reference's distance matrix [B, N], the mask of pairs whose distance
    carries a gradient (off-diagonal, E >= 1e-12; None unless ``need_active``), and the near
    pairs. The clamp is the reference's ``clamp(min=1e-12)`` (NaN stays NaN), done in place."""
    e, bi, cj = _sqdist_block(*side, r0, r1)
    active = e >= _EPS if need_active else None  # the diagonal is 0 here: never active
    d = e.clamp_min_(_EPS).sqrt_()
    d.diagonal(offset=r0).zero_()
    return d, active, bi, cj


def _block_rows(n: int, block_rows: int | None) -> int:
    """Rows per block; ``>= n`` selects the dense single-block route (N^2 <= 2^23 by default,
    i.e. N <= 2896), which computes each distance matrix once per call instead of once per pass
    and folds the two Laplacian GEMMs of the backward into one."""
    return block_rows if block_rows is not None else max(1, _DIST_BLOCK_ELEMS // n)


@torch.no_grad()
def rkd_distance_fwd(
    student: torch.Tensor, teacher: torch.Tensor, reduction: str, *, block_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RKD distance loss forward. Returns ``(loss, mu_s, mu_t)``: loss 0-dim ([N, N] for
    "none") in the student's dtype; mu_s, mu_t the 0-dim mean off-diagonal distances in
    ``compute_dtype`` (saved for the backward). ``block_rows`` overrides the row-block size."""
    n = student.shape[0]
    dtype = compute_dtype(student, teacher)
    s, t = _prepare(student, dtype), _prepare(teacher, dtype)
    rows = _block_rows(n, block_rows)
    m = n * (n - 1)
    if rows >= n:  # dense route: each distance matrix once
        ds, dt = _dist_block(s, 0, n, False)[0], _dist_block(t, 0, n, False)[0]
        mu_s = ds.sum() / m + 0.0 * s[2].sum()  # NaN carrier: see below
        mu_t = dt.sum() / m + 0.0 * t[2].sum()
        terms = F.smooth_l1_loss(ds.div_(mu_s), dt.div_(mu_t), reduction="none" if reduction == "none" else "sum")
        out = terms / (n * n) if reduction == "mean" else terms
        return out.to(student.dtype), mu_s, mu_t
    sum_s = student.new_zeros((), dtype=dtype)
    sum_t = student.new_zeros((), dtype=dtype)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        sum_s += _dist_block(s, r0, r1, False)[0].sum()
        sum_t += _dist_block(t, r0, r1, False)[0].sum()
    # NaN carrier: a NaN/inf input row gives NaN E entries, which the clamp mask (E >= 1e-12 is
    # False for NaN) would turn into finite distances; 0 * sum(s_i) is NaN for any non-finite
    # input and 0 otherwise, so mu (and through it the loss and, saved, both gradients) is NaN.
    mu_s = sum_s / m + 0.0 * s[2].sum()
    mu_t = sum_t / m + 0.0 * t[2].sum()
    out = student.new_empty((n, n), dtype=dtype) if reduction == "none" else student.new_zeros((), dtype=dtype)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        ds, dt = _dist_block(s, r0, r1, False)[0], _dist_block(t, r0, r1, False)[0]
        terms = F.smooth_l1_loss(ds.div_(mu_s), dt.div_(mu_t), reduction="none")
        if reduction == "none":
            out[r0:r1] = terms
        else:
            out += terms.sum()
    if reduction == "mean":
        out = out / (n * n)
    return out.to(student.dtype), mu_s, mu_t


def _laplacian_rows(a: torch.Tensor, xc: torch.Tensor, r0: int, r1: int, out: torch.Tensor) -> None:
    """out[r0:r1] += rowsum(a) * X~[r0:r1] - a X~ for a row block ``a`` [B, N]."""
    out[r0:r1] += torch.addmm(a.sum(1, keepdim=True) * xc[r0:r1], a, xc, alpha=-1)


def _explicit_pairs_add(xf: torch.Tensor, rows, cols, weights: list, outs: list) -> None:
    """outs[k][rows[p]] += weights[k][p] (x_rows[p] - x_cols[p]) with explicit differences of
    the original rows, in chunks of about 2^24 elements."""
    step = max(1, _EXPLICIT_ELEMS // max(1, xf.shape[1]))
    for p0 in range(0, rows.shape[0], step):
        r, c = rows[p0 : p0 + step], cols[p0 : p0 + step]
        diff = xf[r] - xf[c]
        for w, out in zip(weights, outs):
            out.index_add_(0, r, diff * w[p0 : p0 + step, None])


def _distance_bwd_dense(gam, s, t, mu_s, mu_t, reduction, need_student, need_teacher, student, teacher):
    """Dense route of :func:`rkd_distance_bwd` (the whole [N, N] matrices at once): c_s, c_t
    are known before the Laplacian, so A = (h' Gamma - 2 c / M) / d is formed directly and each
    side takes one Laplacian GEMM, dX_s = Lap(A_s) X~ / mu_s, dX_t = -Lap(A_t) Y~ / mu_t
    (docs/rkd.md §2; near pairs explicit, §4)."""
    n = s[1].shape[0]
    m = n * (n - 1)
    ds, act_s, bi_s, cj_s = _dist_block(s, 0, n, need_student)
    dt, act_t, bi_t, cj_t = _dist_block(t, 0, n, need_teacher)
    inv_s = torch.where(act_s, ds.reciprocal(), 0) if need_student else None
    inv_t = torch.where(act_t, dt.reciprocal(), 0) if need_teacher else None
    dhat, that = ds.div_(mu_s), dt.div_(mu_t)
    hp = (dhat - that).clamp_(-1, 1)
    if reduction == "none":
        hg = hp * gam
        big_gam = gam + gam.T
        c_s, c_t = torch.vdot(hg.view(-1), dhat.view(-1)), torch.vdot(hg.view(-1), that.view(-1))
        hp.mul_(big_gam)
    else:
        c_s, c_t = gam * torch.vdot(hp.view(-1), dhat.view(-1)), gam * torch.vdot(hp.view(-1), that.view(-1))
        hp.mul_(2 * gam)
    out = []
    for need, inv, side, bi, cj, c, mu, sign, x in (
        (need_student, inv_s, s, bi_s, cj_s, c_s, mu_s, 1.0, student),
        (need_teacher, inv_t, t, bi_t, cj_t, c_t, mu_t, -1.0, teacher),
    ):
        if not need:
            out.append(None)
            continue
        a = (hp - 2 * c / m).mul_(inv)
        lap = torch.zeros_like(side[1])
        if bi.numel():  # near pairs: out of the Laplacian, added from explicit differences
            w = a[bi, cj]
            a[bi, cj] = 0
            _explicit_pairs_add(side[0], bi, cj, [w], [lap])
        lap += torch.addmm(a.sum(1, keepdim=True) * side[1], a, side[1], alpha=-1)
        out.append((lap * (sign / mu)).to(x.dtype))
    return out[0], out[1]


@torch.no_grad()
def rkd_distance_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    mu_s: torch.Tensor,
    mu_t: torch.Tensor,
    reduction: str,
    need_student: bool,
    need_teacher: bool,
    *,
    block_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RKD distance loss backward: ``(grad_student | None, grad_teacher | None)``.

    docs/rkd.md §2: A = (h' Gamma - 2 c) / (mu d) on live pairs; since c needs a full pass, the
    two parts h' Gamma / d and 1 / d are accumulated separately (Laplacian GEMMs for far pairs,
    explicit differences for near pairs, §4) and combined at the end: one pass in all."""
    n = student.shape[0]
    dtype = compute_dtype(student, teacher)
    s, t = _prepare(student, dtype), _prepare(teacher, dtype)
    rows = _block_rows(n, block_rows)
    gam = grad.to(dtype)
    if reduction == "mean":
        gam = gam / (n * n)
    if rows >= n:
        return _distance_bwd_dense(gam, s, t, mu_s, mu_t, reduction, need_student, need_teacher, student, teacher)
    c_s = student.new_zeros((), dtype=dtype)
    c_t = student.new_zeros((), dtype=dtype)
    # lap_*[0] accumulates Lap(h'Gamma/d) X~, lap_*[1] accumulates Lap(1/d) X~.
    # contiguous, as the op's fake declares (zeros_like would copy a transposed input's strides)
    lap_s = [s[1].new_zeros(s[1].shape) for _ in range(2)] if need_student else None
    lap_t = [t[1].new_zeros(t[1].shape) for _ in range(2)] if need_teacher else None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        ds, act_s, bi_s, cj_s = _dist_block(s, r0, r1)
        dt, act_t, bi_t, cj_t = _dist_block(t, r0, r1)
        dhat, that = ds / mu_s, dt / mu_t
        hp = (dhat - that).clamp_(-1, 1)
        if reduction == "none":
            g_blk, big_gam = gam[r0:r1], gam[r0:r1] + gam[:, r0:r1].T
        else:
            g_blk, big_gam = gam, 2 * gam
        hg = hp * g_blk
        c_s += (hg * dhat).sum()
        c_t += (hg * that).sum()
        hp.mul_(big_gam)
        for lap, dist, act, side, bi, cj in ((lap_s, ds, act_s, s, bi_s, cj_s), (lap_t, dt, act_t, t, bi_t, cj_t)):
            if lap is None:
                continue
            inv = torch.where(act, dist.reciprocal(), 0)
            a0 = hp * inv
            if bi.numel():  # near pairs: out of the Laplacian, added from explicit differences
                w0, w1 = a0[bi, cj], inv[bi, cj]
                a0[bi, cj] = 0
                inv[bi, cj] = 0
                _explicit_pairs_add(side[0], bi + r0, cj, [w0, w1], lap)
            _laplacian_rows(a0, side[1], r0, r1, lap[0])
            _laplacian_rows(inv, side[1], r0, r1, lap[1])
    m = n * (n - 1)
    grad_s = grad_t = None
    if lap_s is not None:
        grad_s = ((lap_s[0] - (2 * c_s / m) * lap_s[1]) / mu_s).to(student.dtype)
    if lap_t is not None:
        grad_t = ((lap_t[1] * (2 * c_t / m) - lap_t[0]) / mu_t).to(teacher.dtype)
    return grad_s, grad_t


# ---------------------------------------------------------------------------------------------
# Angle loss (docs/rkd.md §3, §4)
#
# E route, anchor a (not near): v_b = 1/max(sqrt(E_ab), 1e-12) if E_ab > 0 else 0, and
#   psi_a = -1/2 D_v E D_v + w v^T + v w^T,  w = v * E[a, :] / 2
# (the polarization identity C_a[b, c] = (E_ab + E_ac - E_bc) / 2, scaled by v_b v_c): one
# scaled copy of E and a rank-2 batched GEMM update per chunk. Backward: P_a = U_a * v v^T,
#   Z -= P_a / 2,   Z[a, :] += P_a 1 - q_a * (U_a * psi_a) 1,   q_ab = v_b^2 (E_ab >= 1e-24)
# then S = Z + Z^T (diagonal zeroed: E_bb = 0 is no function of X) and dX = 2 Lap(S) X~.
# Explicit route, near anchor a: V = X - x_a (original rows), V^ = V / max(|v_b|, 1e-12),
#   psi_a = V^ V^^T;  G = 2 U_a V^;  dV = (G - V^ (V^ . G)) / |v_b| (0 where |v_b| < 1e-12);
#   dX += dV,  dx_a -= sum_b dV_b.
# ---------------------------------------------------------------------------------------------


def _angle_side(x: torch.Tensor, dtype: torch.dtype, rows: int):
    """(original rows, X~, E [N, N] with explicit near entries, near-row mask [N])."""
    xf, xc, sq = _prepare(x, dtype)
    n = x.shape[0]
    e = xc.new_empty((n, n))
    near_row = torch.zeros(n, dtype=torch.bool, device=x.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        e[r0:r1], bi, _ = _sqdist_block(xf, xc, sq, r0, r1)
        near_row[bi + r0] = True
    return xf, xc, e, near_row


def _psi_chunk(e: torch.Tensor, skip: torch.Tensor, a0: int, a1: int):
    """E-route psi [B, N, N] for anchors a0:a1 (0 for anchors in ``skip``), v [B, N], and the
    norm-path weights q = v^2 [B, N] (0 where the norm gets no gradient)."""
    ea = e[a0:a1]
    ok = (ea > 0) & ~skip[a0:a1, None]
    v = torch.where(ok, ea.sqrt().clamp_min_(_EPS).reciprocal_(), 0)
    q = torch.where(ea >= _EPS * _EPS, v * v, 0)
    w = v * ea * 0.5
    psi = e.unsqueeze(0) * v.unsqueeze(2)
    psi.mul_(v.unsqueeze(1)).baddbmm_(torch.stack((w, v), 2), torch.stack((v, w), 1), beta=-0.5)
    return psi, v, q


def _explicit_psi(xf: torch.Tensor, anchors: torch.Tensor):
    """Explicit route for ``anchors`` [B]: (V^ [B, N, D], |v| [B, N], psi [B, N, N])."""
    v = xf.unsqueeze(0) - xf[anchors].unsqueeze(1)
    norm = torch.linalg.vector_norm(v, dim=2)
    vh = v.div_(norm.clamp_min(_EPS).unsqueeze(2))
    return vh, norm, torch.bmm(vh, vh.transpose(1, 2))


def _angle_chunk(n: int, chunk: int | None) -> int:
    return chunk if chunk is not None else max(1, _ANGLE_CHUNK_ELEMS // (n * n))


def _explicit_chunk(n: int, d: int, chunk: int | None) -> int:
    return chunk if chunk is not None else max(1, _EXPLICIT_ELEMS // (n * max(d, n)))


def _angle_inputs(student, teacher, chunk):
    n = student.shape[0]
    dtype = compute_dtype(student, teacher)
    rows = max(1, _DIST_BLOCK_ELEMS // n)
    s, t = _angle_side(student, dtype, rows), _angle_side(teacher, dtype, rows)
    near = s[3] | t[3]
    near_idx = near.nonzero().squeeze(1)  # host sync on CUDA tensors (see the module docstring)
    xchunk = _explicit_chunk(n, max(student.shape[1], teacher.shape[1]), chunk)
    return dtype, s, t, near, near_idx, _angle_chunk(n, chunk), xchunk


@torch.no_grad()
def rkd_angle_fwd(
    student: torch.Tensor, teacher: torch.Tensor, reduction: str, *, chunk: int | None = None
) -> torch.Tensor:
    """RKD angle loss forward: 0-dim ([N] for "none") in the student's dtype. ``chunk``
    overrides the number of anchors per chunk (both routes)."""
    n = student.shape[0]
    dtype, s, t, near, near_idx, step, xstep = _angle_inputs(student, teacher, chunk)
    per_anchor = student.new_empty(n, dtype=dtype)
    for a0 in range(0, n, step):
        a1 = min(n, a0 + step)
        ps, pt = _psi_chunk(s[2], near, a0, a1)[0], _psi_chunk(t[2], near, a0, a1)[0]
        per_anchor[a0:a1] = F.smooth_l1_loss(ps, pt, reduction="none").sum((1, 2))
    for k0 in range(0, near_idx.numel(), xstep):
        idx = near_idx[k0 : k0 + xstep]
        ps, pt = _explicit_psi(s[0], idx)[2], _explicit_psi(t[0], idx)[2]
        per_anchor[idx] = F.smooth_l1_loss(ps, pt, reduction="none").sum((1, 2))
    if reduction == "none":
        out = per_anchor / (n * n)
    elif reduction == "sum":
        out = per_anchor.sum()
    else:
        out = per_anchor.sum() / (n * n * n)
    return out.to(student.dtype)


def _accumulate_z(z: torch.Tensor, u: torch.Tensor, psi: torch.Tensor, v: torch.Tensor, q: torch.Tensor, a0: int, a1: int):
    """Z += dL/dE of anchors a0:a1 (E route) given U = dL/dpsi [B, N, N]."""
    b, n = v.shape
    # sum_c P_a[b, c] = v_ab (U_a v_a)_b and sum_c U_abc psi_abc as batched GEMVs / dots: both
    # read U once, with no [B, N, N] temporary; then P = U * v v^T is formed once for Z -= sum_a P / 2.
    rows = torch.bmm(u, v.unsqueeze(2)).squeeze(2).mul_(v)
    dots = torch.bmm(u.reshape(b * n, 1, n), psi.reshape(b * n, n, 1)).view(b, n)
    z[a0:a1] += rows.sub_(q * dots)
    p = u * v.unsqueeze(2)
    z -= 0.5 * p.mul_(v.unsqueeze(1)).sum(0)


def _explicit_grad(dx: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, norm: torch.Tensor, idx: torch.Tensor):
    """dX += the explicit route's gradient of anchors ``idx`` given U [B, N, N] (sign included)."""
    g = torch.bmm(u, vh).mul_(2)
    g.sub_(vh * (vh * g).sum(2, keepdim=True))
    dv = g.mul_(torch.where(norm >= _EPS, norm.reciprocal(), 0).unsqueeze(2))  # no gradient below eps
    dx += dv.sum(0)
    dx.index_add_(0, idx, dv.sum(1), alpha=-1)


@torch.no_grad()
def rkd_angle_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    reduction: str,
    need_student: bool,
    need_teacher: bool,
    *,
    chunk: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RKD angle loss backward: ``(grad_student | None, grad_teacher | None)``."""
    n = student.shape[0]
    dtype, s, t, near, near_idx, step, xstep = _angle_inputs(student, teacher, chunk)
    if reduction == "none":
        scale = grad.to(dtype) / (n * n)
    else:
        scale = (grad.to(dtype) / (n**3 if reduction == "mean" else 1)).expand(n)
    z_s = torch.zeros_like(s[2]) if need_student else None
    z_t = torch.zeros_like(t[2]) if need_teacher else None
    for a0 in range(0, n, step):
        a1 = min(n, a0 + step)
        ps, vs, qs = _psi_chunk(s[2], near, a0, a1)
        pt, vt, qt = _psi_chunk(t[2], near, a0, a1)
        # U = h'(psi_s - psi_t) * w, in pt's storage when the teacher's psi is not needed again
        u = torch.sub(ps, pt, out=pt) if z_t is None else ps - pt
        u.clamp_(-1, 1).mul_(scale[a0:a1, None, None])
        if z_s is not None:
            _accumulate_z(z_s, u, ps, vs, qs, a0, a1)
        if z_t is not None:
            _accumulate_z(z_t, u, pt, vt, qt, a0, a1)  # sign applied below
    out = []
    for z, side, sign in ((z_s, s, 1.0), (z_t, t, -1.0)):
        if z is None:
            out.append(None)
            continue
        sym = z + z.T
        sym.diagonal().zero_()
        out.append((2 * sign) * torch.addmm(sym.sum(1, keepdim=True) * side[1], sym, side[1], alpha=-1))
    for k0 in range(0, near_idx.numel(), xstep):
        idx = near_idx[k0 : k0 + xstep]
        vhs, ns, ps = _explicit_psi(s[0], idx)
        vht, nt, pt = _explicit_psi(t[0], idx)
        u = (ps - pt).clamp_(-1, 1).mul_(scale[idx, None, None])
        if out[0] is not None:
            _explicit_grad(out[0], u, vhs, ns, idx)
        if out[1] is not None:
            _explicit_grad(out[1], -u, vht, nt, idx)
    grad_s = out[0].to(student.dtype) if out[0] is not None else None
    grad_t = out[1].to(teacher.dtype) if out[1] is not None else None
    return grad_s, grad_t
