"""RKD distance and angle losses on the memory-efficient PyTorch path, with hand-written
forward and backward functions (no autograd inside). This is the CPU kernel, the GPU fallback,
and the blueprint for the Triton and CUDA kernels, which have the same signatures.

Design (LOSSES.md §1, §2):

* Everything is built from the Gram matrix of the column-centred features, X̃ = X - mean(X):
  squared distances E_ij = |x̃_i|² + |x̃_j|² - 2 G_ij and, for the angle loss,
  C_a[b, c] = <x_b - x_a, x_c - x_a> = G_bc - G_ab - G_ac + G_aa (the polarization identity
  makes this a function of E only, so the gradient has the Laplacian / Gram form). Centring is
  exact (both losses are translation-invariant) and removes most of the cancellation.
* Distances come in row blocks of about 8M entries ([B, N] with B = 2^23 // N rows, 32 MB in
  fp32), and are recomputed in every pass instead of stored: distance forward = pass 1
  (Σd for μ) + pass 2 (loss); backward = one pass. No N x N buffer unless reduction="none".
* The angle loss runs over anchors in chunks of about 16M entries ([B, N, N] with
  B = 2^24 // N², 64 MB in fp32): no N x N x D and no N x N x N buffer.
* Exact duplicates. The reference clamps the squared distance of identical rows to 1e-12
  (distance 1e-6, zero gradient) and its F.normalize maps their zero difference vector to 0
  (every triple at such a pair has ψ = 0). In fp32 the Gram route gives such pairs tiny
  nonzero squared distances (rounding of |x|² ~ 1e-5) that would wreck both. Choice made here:
  keep the fast Gram route for the values and decide "identical rows" exactly from the rows'
  bits (``row_keys``: two modular hashes of the 16-bit pieces of every element, O(N·D), no
  host sync; a false match between different rows has probability ~2^-62 per pair). Identical
  pairs then get exactly the reference's treatment. Distinct but nearly coincident rows
  (closer than ~sqrt(eps)·|x̃|) are resolved only to Gram-route precision (as the upstream
  pdist for the distance loss; the upstream angle loss uses explicit differences): in the angle
  loss a difference below 8 ulp of |x̃_a|² + |x̃_b|² counts as zero (ψ = 0 there) and ψ is
  clamped to [-1, 1], so rounding noise cannot blow up ψ. (Exact per-pair distances, e.g. torch.cdist without the mm trick, are ~20x slower
  on CPU at N=16384, D=512 and buy nothing for rows that are not identical.)
  One deliberate difference: when two rows are identical in the student but not in the
  teacher, the reference's angle gradient on them is (1/eps = 1e12) x a nonzero number (the
  derivative of F.normalize at a zero vector); here a degenerate ψ is a constant 0, so those
  pairs get no gradient. Values, and all gradients when duplicates are shared by both
  networks (the usual case: the same sample twice in a batch), match the reference.
* Inputs are computed in float32 (float64 if student or teacher is float64); results are cast
  to the student's dtype, gradients to each input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["compute_dtype", "rkd_angle_bwd", "rkd_angle_fwd", "rkd_distance_bwd", "rkd_distance_fwd", "row_keys"]

# The reference's clamp on squared distances (pdist) and F.normalize's eps on norms.
_EPS = 1e-12
# Distance row block: B = 2^23 // N rows, so each [B, N] fp32 temporary is 32 MB and the ~10
# live ones stay well inside the 1.5 GB budget at N = 16384 while the GEMMs stay large.
_DIST_BLOCK_ELEMS = 1 << 23
# Angle: |x_b - x_a|² below this many ulps of |x̃_a|² + |x̃_b|² is rounding noise of the Gram route.
_GRAM_FLOOR = 8
# Angle anchor chunk: B = 2^24 // N² anchors, 64 MB per [B, N, N] fp32 temporary (~5 live).
_ANGLE_CHUNK_ELEMS = 1 << 24
# row_keys: arithmetic modulo the Mersenne prime 2^31 - 1; 16-bit pieces times 31-bit weights
# stay below 2^47 and sums of < 2^32 reduced terms below 2^63, so int64 never overflows.
_KEY_PRIME = 2**31 - 1
_KEY_BLOCK_ELEMS = 1 << 21  # rows per key block = this // (D * pieces): 32 MB of int64 per temp
_key_weights: dict[tuple[int, torch.device], torch.Tensor] = {}


def compute_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """float64 if either input is float64, else float32 (the dtype of the saved μ's too)."""
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def row_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys [N] of the rows of ``x`` [N, D] (float32 or float64): bit-identical rows get
    equal keys; different rows collide with probability ~2^-62.

    key_i = h1_i · P + h2_i, h_j = Σ_{k,q} piece_kq(x_i) · R_j[k, q] mod P, where piece_kq are the
    16-bit pieces of element k's bit pattern (-0.0 folded into +0.0 first) and R_1, R_2 are fixed
    pseudo-random weights in [1, P). Integer sums are exact, so the key does not depend on
    reduction order (identical rows always match, on any device).
    """
    n, d = x.shape
    x = (x + 0.0).contiguous()  # -0.0 + 0.0 = +0.0: equal values, equal bits
    bits = x.view(torch.int32 if x.dtype == torch.float32 else torch.int64)
    pieces = 2 if x.dtype == torch.float32 else 4
    m = d * pieces
    key = (m, x.device)
    if key not in _key_weights:
        gen = torch.Generator().manual_seed(0x5EED)
        _key_weights[key] = torch.randint(1, _KEY_PRIME, (2, m), generator=gen, dtype=torch.int64).to(x.device)
    weights = _key_weights[key]
    shifts = torch.arange(0, 16 * pieces, 16, device=x.device, dtype=torch.int64)
    rows = max(1, _KEY_BLOCK_ELEMS // m)
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    for r0 in range(0, n, rows):
        b = bits[r0 : r0 + rows].to(torch.int64)
        p = ((b.unsqueeze(-1) >> shifts) & 0xFFFF).reshape(b.shape[0], 1, m)
        h = (p * weights).remainder_(_KEY_PRIME).sum(-1).remainder_(_KEY_PRIME)  # [B, 2]
        out[r0 : r0 + rows] = h[:, 0] * _KEY_PRIME + h[:, 1]
    return out


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X̃ = centred copy in ``dtype``, |x̃_i|² [N], exact row keys [N])."""
    xf = x.to(dtype)
    keys = row_keys(xf)
    xc = xf - xf.mean(0)
    return xc, (xc * xc).sum(1), keys


# ---------------------------------------------------------------------------------------------
# Distance loss (LOSSES.md §2.1, §2.3)
#
# Forward.  E_ij = |x̃_i|² + |x̃_j|² - 2 x̃_i·x̃_j; pairs of identical rows (equal keys) have
#   E_ij := 0.  d_ij = sqrt(max(E_ij, 1e-12)) for i != j, d_ii = 0.  M = N(N-1) (the reference's
#   "d > 0" keeps exactly the off-diagonal: clamped distances are 1e-6 > 0).
#   μ_s = Σ_ij d_ij / M (pass 1);  d̂ = d/μ_s, t̂ = t/μ_t;  ℓ_ij = h(d̂_ij - t̂_ij), h = smooth-L1
#   (β = 1) (pass 2).  "none": ℓ [N, N]; "sum": Σ ℓ; "mean": Σ ℓ / N².
# Backward.  γ_ij = ∂L/∂ℓ_ij (grad/N², grad or grad[i, j]); h'(x) = clamp(x, -1, 1);
#   g_ij = h'(d̂_ij - t̂_ij) γ_ij;  c_s = Σ g d̂ / M;  c_t = Σ g t̂ / M.
#   ∂L/∂d_ij = (g_ij - c_s)/μ_s (the second term is the path through μ_s).
#   A_ij = (∂L/∂d_ij + ∂L/∂d_ji)/d_ij = (h'_ij Γ_ij - 2 c_s) / (μ_s d_ij) on active pairs
#   (i != j, rows not identical, E_ij >= 1e-12: the clamp passes no gradient), Γ = γ + γᵀ;
#   ∂L/∂X = Lap(A) X̃ with Lap(A) X̃ = rowsum(A) ⊙ X̃ - A X̃ (one GEMM per row block).
#   Since c_s needs a full pass, split A = h'Γ/(μ_s d) - (2 c_s/μ_s)/d and accumulate both
#   Laplacian products in the same pass: one backward pass in all.
#   Teacher (mirror, t̂ enters with the opposite sign): ∂L/∂Y = -Lap(h'Γ/t - 2 c_t/t) Ỹ / μ_t.
# ---------------------------------------------------------------------------------------------


def _dist_block(xc: torch.Tensor, sq: torch.Tensor, keys: torch.Tensor, r0: int, r1: int):
    """Rows r0:r1 of the reference's distance matrix [B, N] and the mask of pairs whose
    distance carries a gradient."""
    e = torch.addmm(sq[r0:r1, None] + sq[None, :], xc[r0:r1], xc.T, alpha=-2)
    active = (e >= _EPS) & (keys[r0:r1, None] != keys[None, :])
    d = torch.where(active, e, _EPS).sqrt_()
    d.diagonal(offset=r0).zero_()
    return d, active


def _block_rows(n: int, block_rows: int | None) -> int:
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
    sum_s = student.new_zeros((), dtype=dtype)
    sum_t = student.new_zeros((), dtype=dtype)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        sum_s += _dist_block(*s, r0, r1)[0].sum()
        sum_t += _dist_block(*t, r0, r1)[0].sum()
    mu_s, mu_t = sum_s / m, sum_t / m
    out = student.new_empty((n, n), dtype=dtype) if reduction == "none" else student.new_zeros((), dtype=dtype)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        ds, dt = _dist_block(*s, r0, r1)[0], _dist_block(*t, r0, r1)[0]
        terms = F.smooth_l1_loss(ds.div_(mu_s), dt.div_(mu_t), reduction="none")
        if reduction == "none":
            out[r0:r1] = terms
        else:
            out += terms.sum()
    if reduction == "mean":
        out = out / (n * n)
    return out.to(student.dtype), mu_s, mu_t


def _laplacian_rows(a: torch.Tensor, xc: torch.Tensor, r0: int, r1: int, out: torch.Tensor) -> None:
    """out[r0:r1] += rowsum(a) ⊙ X̃[r0:r1] - a X̃ for a row block ``a`` [B, N]."""
    out[r0:r1] += torch.addmm(a.sum(1, keepdim=True) * xc[r0:r1], a, xc, alpha=-1)


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
    """RKD distance loss backward: ``(grad_student | None, grad_teacher | None)``."""
    n = student.shape[0]
    dtype = compute_dtype(student, teacher)
    s, t = _prepare(student, dtype), _prepare(teacher, dtype)
    rows = _block_rows(n, block_rows)
    gam = grad.to(dtype)
    if reduction == "mean":
        gam = gam / (n * n)
    c_s = student.new_zeros((), dtype=dtype)
    c_t = student.new_zeros((), dtype=dtype)
    # lap_*[0] accumulates Lap(h'Γ/d) X̃, lap_*[1] accumulates Lap(1/d) X̃ (see the math above).
    # contiguous, as the op's fake declares (zeros_like would copy a transposed input's strides)
    lap_s = [s[0].new_zeros(s[0].shape) for _ in range(2)] if need_student else None
    lap_t = [t[0].new_zeros(t[0].shape) for _ in range(2)] if need_teacher else None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        ds, act_s = _dist_block(*s, r0, r1)
        dt, act_t = _dist_block(*t, r0, r1)
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
        for lap, dist, act, xc in ((lap_s, ds, act_s, s[0]), (lap_t, dt, act_t, t[0])):
            if lap is not None:
                inv = torch.where(act, dist.reciprocal(), 0)
                _laplacian_rows(hp * inv, xc, r0, r1, lap[0])
                _laplacian_rows(inv, xc, r0, r1, lap[1])
    m = n * (n - 1)
    grad_s = grad_t = None
    if lap_s is not None:
        grad_s = ((lap_s[0] - (2 * c_s / m) * lap_s[1]) / mu_s).to(student.dtype)
    if lap_t is not None:
        grad_t = ((lap_t[1] * (2 * c_t / m) - lap_t[0]) / mu_t).to(teacher.dtype)
    return grad_s, grad_t


# ---------------------------------------------------------------------------------------------
# Angle loss (LOSSES.md §2.1, §2.3)
#
# Forward.  G = X̃X̃ᵀ.  For anchor a: C[b, c] = G_bc - G_ab - G_ac + G_aa = <x_b - x_a, x_c - x_a>,
#   n_b = sqrt(max(C[b, b], 0)) = |x_b - x_a|, r_b = max(n_b, 1e-12) (F.normalize),
#   v_b = 0 if rows a and b are identical (equal keys; includes b = a) or if C[b, b] is within
#   the Gram route's rounding (<= 8 ulp (G_aa + G_bb): unresolved, treated as identical) else 1/r_b,
#   ψ[b, c] = C[b, c] v_b v_c (= 0 on degenerate triples, as the reference's normalize of a
#   zero vector), clamped to [-1, 1] (Cauchy-Schwarz; the reference's explicit differences
#   respect it, but in fp32 the Gram route's rounding makes ψ of distinct, nearly coincident
#   rows arbitrarily large, e.g. 1e5, without the clamp).  ℓ_a = Σ_bc h(ψˢ[b, c] - ψᵗ[b, c]).  "none": ℓ / N²; "sum": Σ ℓ; "mean": Σ ℓ / N³.
# Backward (student; anchors in chunks).  U[b, c] = h'(ψˢ - ψᵗ) γ_a (γ_a = grad/N³, grad, or
#   grad[a]/N²), zeroed where the clamp of ψ was active (torch.clamp's gradient).  ψ[b, c] depends on C[b, c] and, through the norms, on C[b, b] and C[c, c]:
#   P[b, c] = ∂L/∂C[b, c] = U[b, c] v_b v_c,
#   P[b, b] -= Σ_c U[b, c] ψ[b, c] / n_b²   (norm path; 0 where n_b < 1e-12 or b is degenerate;
#                                          U and ψ are symmetric, so both index paths are equal).
#   C is linear in G:  W += P;  W[a, :] -= P·1 + Pᵀ·1 (= 2 P·1);  W[a, a] += 1ᵀ P 1.
#   Finally ∂L/∂X = (W + Wᵀ) X̃ (rows of (W + Wᵀ) sum to 0, so no centring term).
#   Teacher: the same with ψᵗ, its v's, and U replaced by -U.
# ---------------------------------------------------------------------------------------------


def _angle_prepare(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X̃, G = X̃X̃ᵀ [N, N], mask of non-identical row pairs [N, N])."""
    xc, _, keys = _prepare(x, dtype)
    return xc, xc @ xc.T, keys[:, None] != keys[None, :]


def _psi_chunk(g: torch.Tensor, distinct: torch.Tensor, a0: int, a1: int):
    """ψ [B, N, N] for anchors a0:a1, v = 1/r [B, N] (0 when degenerate), and the norm-path
    weights 1/n² [B, N] (0 where the norm gets no gradient).

    ψ_a = D_v (G - g_a 1ᵀ - 1 g_aᵀ + G_aa 11ᵀ) D_v = D_v G D_v - w vᵀ - v wᵀ with
    w = v ⊙ (g_a - G_aa/2): one scaled copy of G and a rank-2 batched GEMM update, instead of
    forming C and scaling it (fewer passes over the [B, N, N] chunk)."""
    ga = g[a0:a1]
    gaa = g.diagonal()[a0:a1, None]
    norm2 = g.diagonal()[None, :] - 2 * ga + gaa  # |x_b - x_a|²
    # below the Gram route's rounding floor the difference is unresolved: treat it as zero
    ok = distinct[a0:a1] & (norm2 > _GRAM_FLOOR * torch.finfo(g.dtype).eps * (g.diagonal()[None, :] + gaa))
    norm = norm2.clamp_min_(0).sqrt_()
    v = torch.where(ok, norm.clamp_min(_EPS).reciprocal(), 0)
    w2 = torch.where(ok & (norm >= _EPS), v * v, 0)
    w = v * (ga - gaa / 2)
    psi = g.unsqueeze(0) * v.unsqueeze(2)
    psi.mul_(v.unsqueeze(1)).baddbmm_(torch.stack((w, v), 2), torch.stack((-v, -w), 1))
    return psi, v, w2


def _angle_chunk(n: int, chunk: int | None) -> int:
    return chunk if chunk is not None else max(1, _ANGLE_CHUNK_ELEMS // (n * n))


@torch.no_grad()
def rkd_angle_fwd(
    student: torch.Tensor, teacher: torch.Tensor, reduction: str, *, chunk: int | None = None
) -> torch.Tensor:
    """RKD angle loss forward: 0-dim ([N] for "none") in the student's dtype. ``chunk``
    overrides the number of anchors per chunk."""
    n = student.shape[0]
    dtype = compute_dtype(student, teacher)
    _, gs, ok_s = _angle_prepare(student, dtype)
    _, gt, ok_t = _angle_prepare(teacher, dtype)
    step = _angle_chunk(n, chunk)
    per_anchor = student.new_empty(n, dtype=dtype)
    for a0 in range(0, n, step):
        a1 = min(n, a0 + step)
        ps, pt = _psi_chunk(gs, ok_s, a0, a1)[0].clamp_(-1, 1), _psi_chunk(gt, ok_t, a0, a1)[0].clamp_(-1, 1)
        per_anchor[a0:a1] = F.smooth_l1_loss(ps, pt, reduction="none").sum((1, 2))
    if reduction == "none":
        out = per_anchor / (n * n)
    elif reduction == "sum":
        out = per_anchor.sum()
    else:
        out = per_anchor.sum() / (n * n * n)
    return out.to(student.dtype)


def _accumulate_w(
    w: torch.Tensor, u: torch.Tensor, psi: torch.Tensor, v: torch.Tensor, w2: torch.Tensor, a0: int, a1: int
):
    """W += ∂L/∂G of anchors a0:a1 given U = ∂L/∂ψ [B, N, N] (see the math above)."""
    p = u * v.unsqueeze(2)
    p.mul_(v.unsqueeze(1))
    p.diagonal(dim1=1, dim2=2).sub_((u * psi).sum(2).mul_(w2))
    w += p.sum(0)
    rs = p.sum(2)
    w[a0:a1] -= 2 * rs
    w.diagonal()[a0:a1] += rs.sum(1)


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
    dtype = compute_dtype(student, teacher)
    xs, gs, ok_s = _angle_prepare(student, dtype)
    xt, gt, ok_t = _angle_prepare(teacher, dtype)
    step = _angle_chunk(n, chunk)
    if reduction == "none":
        scale = grad.to(dtype) / (n * n)
    else:
        scale = (grad.to(dtype) / (n**3 if reduction == "mean" else 1)).expand(n)
    w_s = torch.zeros_like(gs) if need_student else None
    w_t = torch.zeros_like(gt) if need_teacher else None
    for a0 in range(0, n, step):
        a1 = min(n, a0 + step)
        ps, vs, w2s = _psi_chunk(gs, ok_s, a0, a1)
        pt, vt, w2t = _psi_chunk(gt, ok_t, a0, a1)
        live_s, live_t = ps.abs() <= 1, pt.abs() <= 1  # where the clamp of ψ passes a gradient
        u = (ps.clamp_(-1, 1) - pt.clamp_(-1, 1)).clamp_(-1, 1).mul_(scale[a0:a1, None, None])
        if w_s is not None:
            _accumulate_w(w_s, u * live_s, ps, vs, w2s, a0, a1)
        if w_t is not None:
            _accumulate_w(w_t, u * live_t, pt, vt, w2t, a0, a1)  # sign applied below
    grad_s = ((w_s + w_s.T) @ xs).to(student.dtype) if w_s is not None else None
    grad_t = (-((w_t + w_t.T) @ xt)).to(teacher.dtype) if w_t is not None else None
    return grad_s, grad_t
