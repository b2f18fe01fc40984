"""Triton kernels of gram / CKA / relation in the N x N form (N <= max(Ds, Dt), the wide-feature
case); math in docs/geometry.md §3 and the module docstring of kd_kernels/torch_impl/geometry.py.
Called by the launchers of kd_kernels/triton/geometry.py (the D x D form lives there).

The saved layout is the torch path's N x N one: (μ_x, s_x, μ_y, s_y, K̄, empty, L̄, h) with
K̄ = X̄X̄ᵀ, L̄ = ȲȲᵀ [B, N, N] fp32 (gram: K̄ − L̄ in the first slot and h = (ℓ, 0, 0)).

Forward: ONE kernel (``_nn_products_kernel``) forms the raw masked Gram matrices
K' = W X'X'ᵀ W and L' = W Y'Y'ᵀ W (X' = X − 1cᵀ, c a kept row for fp32 with centring, else
c = 0; see kd_kernels/triton/geometry.py ``_dd_forward`` for why the shift) plus the column sums
Σ w x' and the kept-row count. Grid: (upper-triangle output tiles of K' and L' (each tile also
written mirrored: half the flops), split-K programs over D, B); fp32 partials added with relaxed
atomics. Then torch ops on the N x N matrices (no host sync):

- centring, the rank-1 correction from the row sums r = K'w = W X'(Σ_j w_j x'_j) = n W X'δ
  (δ = Σ w x'/n = μ − c): with u = r/n = W X'δ and ‖δ‖² = Σ_i r_i / n²,
      K̃ = W(X' − 1δᵀ)(X' − 1δᵀ)ᵀW = K' − u wᵀ − w uᵀ + ‖δ‖² w wᵀ = K' − v wᵀ − w vᵀ,
      v = u − ‖δ‖² w / 2
  (the brief's W(XXᵀ − (Xμ)1ᵀ − 1(Xμ)ᵀ + ‖μ‖²11ᵀ)W with Xμ taken from K's row sums: no pass
  over X, and K̃w = 0 holds for the stored matrix to rounding);
- 'frob' scaling from s² = tr K̃; 'row' scaling (relation) from r_i = √K'_ii (the diagonal of
  the raw Gram: no row pass), K̄_ij = K'_ij / (r_i r_j);
- h and the loss (unbiased CKA: ρ = diag K̄) as the torch path.

Backward: ONE streaming GEMM pass per differentiated side (``_nn_grad_kernel``)
      dZ = W T W (Z − 1μᵀ)          (μ = 0 without centring)
with T [B, N, N] fp32 built by torch ops on the saved N x N matrices; T folds the loss derivative
and the whole chain rule of the preprocessing (derivation above ``_nn_backward``): the 'frob'
projection, relation's per-row projection g_i − ⟨g_i, x̄_i⟩x̄_i, unbiased CKA's row terms and
their centring step are N x N terms (a diagonal and a rank-1 matrix), so nothing of size N x D is
formed besides the gradient itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kd_kernels._backend import TRITON_INTERPRET
from kd_kernels.torch_impl import geometry as _torch
from kd_kernels.triton import geometry as _g
from kd_kernels.triton._tiles import dot_precision, policy_dot

EPS = _torch.EPS
FROB, ROW, NONE = _torch.FROB, _torch.ROW, _torch.NONE

# BLOCK_M: output tile of K', L' (BLOCK_M x BLOCK_M, 64 as the D x D products); BLOCK_K: D chunk
# per tl.dot step of the forward (32 for 16-bit operands; fp32 with 3xTF32 has three dots per step
# and steps 16 (BLOCK_K_F32), the D x D kernel's finding: 32 spilled on sm_80). COLS: columns per
# split-K program in the interpreter (so the small tests span several programs); on a GPU the split
# fills ~2 waves (``_split_cols``). Backward: BLOCK_R x BLOCK_D output tile, BLOCK_J rows of T per
# step; fp32 operands (T is fp32, the Z tile is upcast so the chain rule keeps fp32 accuracy):
# the D x D backward's 64 x 64 tile, 16-deep steps and 8 warps, which compile without spills.
# prod_warps: the forward runs 8 warps: with 4 it sat at 250-255 registers and spilled 24-160 B
# (bf16 with a mask on sm_80, fp32 3xTF32 on sm_90a, odd shapes): the mirrored tile store and the
# column-sum atomics hold extra registers next to the 64 x 64 accumulator.
# maxnreg=255 as the D x D kernels (ptxas's occupancy heuristic otherwise caps registers).
NN_CONFIGS = {
    "gpu": {
        "BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_K_F32": 16, "BLOCK_R": 64, "BLOCK_D": 64, "BLOCK_J": 16,
        "num_warps": 4, "prod_warps": 8, "f32_warps": 8, "num_stages": 2, "maxnreg": 255,
    },
    "interpret": {
        "BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_K_F32": 16, "BLOCK_R": 16, "BLOCK_D": 16, "BLOCK_J": 16, "COLS": 32,
        "num_warps": 1, "num_stages": 1,
    },
}  # fmt: skip


def _config() -> dict:
    return NN_CONFIGS["interpret" if TRITON_INTERPRET else "gpu"]


# ----------------------------------------------------------------------------------- kernels


# Forward products, per batch item b, upper-triangle tile (ti <= tj) of K' (which = 0) or L'
# (which = 1) and split-K column range [k_begin, k_end):
#   M[i, j] += Σ_{k in range} a_i[k] a_j[k],   a_i = w_i (z_i − c)   (relaxed atomics; the tile
#   is also added at (j, i) when ti != tj: M is symmetric)
#   colsum[k] += Σ_{i in tile} a_i[k]   (diagonal tiles: every (row tile, column) once)
#   count += Σ_{i in tile} w_i          (K', diagonal tiles, split 0)
@triton.jit
def _nn_products_kernel(
    x_ptr,  # [B, N, Ds] student (unit column stride)
    y_ptr,  # [B, N, Dt] teacher (same dtype as x, unit column stride)
    w_ptr,  # [B, N] int8 row mask (HAS_MASK)
    k_ptr,  # [B, N, N] fp32 zeroed out: K'
    l_ptr,  # [B, N, N] fp32 zeroed out: L'
    csx_ptr,  # [B, Ds] fp32 zeroed out: Σ w (x − c_x)
    csy_ptr,  # [B, Dt] fp32 zeroed out: Σ w (y − c_y)
    shx_ptr,  # [B, Ds] fp32 shift c_x (SHIFT)
    shy_ptr,  # [B, Dt] fp32 shift c_y (SHIFT)
    cnt_ptr,  # [B] fp32 zeroed out: Σ w
    N,  # rows
    Ds,  # student width
    Dt,  # teacher width
    sxb,  # batch / row strides of x and y
    sxn,
    syb,
    syn,
    cols_per_split,  # columns per split-K program (a multiple of BLOCK_K)
    HAS_MASK: tl.constexpr,
    SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    nt = tl.cdiv(N, BLOCK_M)
    ntri = nt * (nt + 1) // 2
    which = (pid >= ntri).to(tl.int32)
    q = pid - which * ntri
    # upper-triangle index q -> (ti, tj), ti <= tj: tj = ⌊(√(8q + 1) − 1)/2⌋ (fixed up for rounding)
    tj = ((tl.sqrt((8 * q + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tj + ((tj + 1) * (tj + 2) // 2 <= q).to(tl.int32)
    tj = tj - (tj * (tj + 1) // 2 > q).to(tl.int32)
    ti = q - tj * (tj + 1) // 2
    if which == 0:
        z_ptr = x_ptr
        m_ptr = k_ptr
        cs_ptr = csx_ptr
        sh_ptr = shx_ptr
    else:
        z_ptr = y_ptr
        m_ptr = l_ptr
        cs_ptr = csy_ptr
        sh_ptr = shy_ptr
    # scalars selected arithmetically (a specialised stride or width cannot mismatch branch types)
    is_y = which.to(tl.int64)
    szb = sxb + (syb - sxb) * is_y
    szn = sxn + (syn - sxn) * is_y
    Dz = Ds + (Dt - Ds) * which
    k_begin = split * cols_per_split
    k_end = tl.minimum(k_begin + cols_per_split, Dz)
    if k_begin < Dz:
        offs_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
        in_i = offs_i < N
        in_j = offs_j < N
        keep_i = in_i
        keep_j = in_j
        if HAS_MASK:
            keep_i = in_i & (tl.load(w_ptr + b * N + offs_i, mask=in_i, other=0) != 0)
            keep_j = in_j & (tl.load(w_ptr + b * N + offs_j, mask=in_j, other=0) != 0)
        # masked rows are read and multiplied by 0 (not skipped): NaN/inf there still reaches the
        # loss, as x·w does on the torch path (README "Non-finite input")
        wi = keep_i.to(tl.float32)
        wj = keep_j.to(tl.float32)
        rows_i = offs_i.to(tl.int64) * szn
        rows_j = offs_j.to(tl.int64) * szn
        diag = ti == tj
        acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = _g._load_rows(
                z_ptr + b * szb, rows_i, offs_k, in_i, k_end, 1, wi, sh_ptr + b * Dz, False, HAS_MASK, SHIFT
            )  # fmt: skip
            c = _g._load_rows(
                z_ptr + b * szb, rows_j, offs_k, in_j, k_end, 1, wj, sh_ptr + b * Dz, False, HAS_MASK, SHIFT
            )  # fmt: skip
            acc = policy_dot(a, tl.trans(c), acc, PREC)
            if diag:
                tl.atomic_add(
                    cs_ptr + b * Dz + offs_k, tl.sum(a.to(tl.float32), axis=0), mask=offs_k < k_end, sem="relaxed"
                )  # fmt: skip
        base = m_ptr + b * N * N
        mij = in_i[:, None] & in_j[None, :]
        tl.atomic_add(base + offs_i.to(tl.int64)[:, None] * N + offs_j[None, :], acc, mask=mij, sem="relaxed")
        if ti != tj:  # the mirrored tile M[j, i] = M[i, j]
            tl.atomic_add(base + offs_j.to(tl.int64)[None, :] * N + offs_i[:, None], acc, mask=mij, sem="relaxed")
        if (which == 0) & diag & (split == 0):
            tl.atomic_add(cnt_ptr + b, tl.sum(wi, axis=0), sem="relaxed")


# Backward GEMM pass, per batch item b, row tile and output column tile:
#   out[i, c] = w_i Σ_j T[i, j] w_j (z_j[c] − μ[c])       (μ = 0 without CENTER)
# T [B, N, N] fp32 folds the loss derivative and the preprocessing chain rule (``_nn_backward``);
# the centring is applied in the loads (no centred copy, no cancellation of large means).
@triton.jit
def _nn_grad_kernel(
    t_ptr,  # [B, N, N] fp32 contiguous
    z_ptr,  # [B, N, D] features (unit column stride)
    w_ptr,  # [B, N] int8 row mask (HAS_MASK)
    mu_ptr,  # [B, D] fp32 column means (CENTER)
    out_ptr,  # [B, N, D] contiguous, the gradient in its dtype
    N,  # rows
    D,  # width
    szb,  # batch / row strides of z
    szn,
    HAS_MASK: tl.constexpr,
    CENTER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_D + tl.arange(0, BLOCK_D)
    in_r = offs_r < N
    keep_r = in_r
    if HAS_MASK:
        keep_r = in_r & (tl.load(w_ptr + b * N + offs_r, mask=in_r, other=0) != 0)
    t_rows = t_ptr + b * N * N + offs_r.to(tl.int64)[:, None] * N
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_j = offs_j < N
        keep_j = in_j
        if HAS_MASK:
            keep_j = in_j & (tl.load(w_ptr + b * N + offs_j, mask=in_j, other=0) != 0)
        t = tl.load(t_rows + offs_j[None, :], mask=in_r[:, None] & in_j[None, :], other=0.0)
        # fp32 tile w_j (z_j − μ) (fp16/bf16 upcast): T keeps fp32 accuracy under the PREC dot
        z = _g._load_rows(
            z_ptr + b * szb, offs_j.to(tl.int64) * szn, offs_c, in_j, D, 1, keep_j.to(tl.float32), mu_ptr + b * D,
            True, False, CENTER,
        )  # fmt: skip
        acc = policy_dot(t, z, acc, PREC)
    acc = acc * keep_r.to(tl.float32)[:, None]  # w ⊙ (…): NaN statistics stay NaN in masked rows, as torch
    optrs = out_ptr + b * N * D + offs_r.to(tl.int64)[:, None] * D + offs_c[None, :]
    tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=in_r[:, None] & (offs_c < D)[None, :])


# ---------------------------------------------------------------------------------- launchers


def _split_cols(d: int, programs: int, bsz: int, cfg: dict, bk: int) -> int:
    """Columns per split-K program: interpreter ``COLS``; GPU: enough programs for ~2 waves."""
    if "COLS" in cfg:
        return cfg["COLS"]
    target = 264  # ~2 waves of 132 SMs (H100); one program per SM-slot is enough for a GEMM tile
    splits = max(1, min(triton.cdiv(d, bk), triton.cdiv(target, programs * bsz)))
    return triton.cdiv(triton.cdiv(d, splits), bk) * bk


def _nn_products(x, y, w, shift=None):
    """K' = W X'X'ᵀ W, L' = W Y'Y'ᵀ W [B, N, N] (X' = X − 1c_xᵀ with shift = (c_x, c_y), else X),
    the column sums Σ w x', Σ w y' and Σ w; all fp32."""
    cfg = _config()
    bsz, n, ds = x.shape
    dt = y.shape[2]
    f32 = {"device": x.device, "dtype": torch.float32}
    k, l_ = torch.zeros(bsz, n, n, **f32), torch.zeros(bsz, n, n, **f32)
    csx, csy, cnt = torch.zeros(bsz, ds, **f32), torch.zeros(bsz, dt, **f32), torch.zeros(bsz, **f32)
    prec = dot_precision()
    bk = cfg["BLOCK_K_F32" if x.dtype == torch.float32 and prec == "tf32x3" else "BLOCK_K"]
    nt = triton.cdiv(n, cfg["BLOCK_M"])
    programs = nt * (nt + 1)  # the upper triangles of K' and L'
    cols = _split_cols(max(ds, dt), programs, bsz, cfg, bk)
    grid = (programs, triton.cdiv(max(ds, dt), cols), bsz)
    _nn_products_kernel[grid](
        x, y, cnt if w is None else w, k, l_, csx, csy,
        cnt if shift is None else shift[0], cnt if shift is None else shift[1], cnt,
        n, ds, dt, x.stride(0), x.stride(1), y.stride(0), y.stride(1), cols,
        HAS_MASK=w is not None, SHIFT=shift is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=bk, PREC=prec,
        **_g._launch_opts(cfg, "prod_warps"),
    )  # fmt: skip
    return k, l_, csx, csy, cnt


def _nn_grad(t, z, w, mu, out_dtype):
    """W T W (Z − 1μᵀ) as [B, N, D] in ``out_dtype`` (μ [B, D] fp32 or None: no centring)."""
    cfg = _config()
    bsz, n, d = z.shape
    out = torch.empty(bsz, n, d, device=z.device, dtype=out_dtype)
    t = t.contiguous()
    grid = (triton.cdiv(n, cfg["BLOCK_R"]), triton.cdiv(d, cfg["BLOCK_D"]), bsz)
    _nn_grad_kernel[grid](
        t, z, t if w is None else w, t if mu is None else mu.contiguous(), out, n, d, z.stride(0), z.stride(1),
        HAS_MASK=w is not None, CENTER=mu is not None, BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"],
        BLOCK_J=cfg["BLOCK_J"], PREC=dot_precision(), **_g._launch_opts(cfg, "f32_warps"),
    )  # fmt: skip
    return out


def _weights(w, bsz, n, device):
    """The 0/1 row weights [B, N] fp32 (ones without a mask)."""
    return torch.ones(bsz, n, device=device) if w is None else w.float()


def _outer(u, v):
    return u[:, :, None] * v[:, None, :]


def _prep(m, cs, cnt, wv, shift, center, norm):
    """K̄ from the raw K' (module docstring), with μ and the scale: (K̄, μ or empty, scale or empty)."""
    empty = m.new_empty(0)
    mu = empty
    if center:
        n = cnt[:, None]
        delta = cs / n
        mu = delta if shift is None else shift + delta
        u = m.sum(dim=2) / n  # W X'δ (masked rows of K' are 0)
        v = u - 0.5 * (u.sum(dim=1, keepdim=True) / n) * wv  # u − ‖δ‖² w / 2  (Σ_i u_i / n = ‖δ‖²)
        m = m - _outer(v, wv) - _outer(wv, v)
    if norm == FROB:  # ‖X̃‖_F² = tr K̃
        scale = m.diagonal(dim1=1, dim2=2).sum(dim=1).clamp_min(0).sqrt().clamp_min(EPS)
        return m / (scale * scale)[:, None, None], mu, scale
    if norm == ROW:  # r_i = ‖x̃_i‖ = √K'_ii
        scale = m.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(EPS)
        inv = 1 / scale
        return m * _outer(inv, inv), mu, scale
    return m, mu, empty


def _nn_forward(kind, student, teacher, mask, center, norm, unbiased):
    x, y, w = _g._views(student, teacher, mask)
    bsz, n = x.shape[0], x.shape[1]
    wv = _weights(w, bsz, n, x.device)
    shift = _g._shifts(x, y, w) if center and x.dtype == torch.float32 else None  # why: _dd_forward
    k, l_, csx, csy, cnt = _nn_products(x, y, w, shift)
    kb, mu_x, s_x = _prep(k, csx, cnt, wv, None if shift is None else shift[0], center, norm)
    lb, mu_y, s_y = _prep(l_, csy, cnt, wv, None if shift is None else shift[1], center, norm)
    empty = kb.new_empty(0)
    if kind == "gram":  # ‖K̄ − L̄‖² formed directly, saved in the K̄ slot (the torch path's layout)
        dm = kb - lb
        loss_i = _torch._bdot(dm, dm)
        h = torch.nn.functional.pad(loss_i[:, None], (0, 2))
        return loss_i.mean().to(student.dtype), (mu_x, s_x, mu_y, s_y, dm, empty, lb, h)
    h = torch.stack([_torch._bdot(kb, kb), _torch._bdot(kb, lb), _torch._bdot(lb, lb)], dim=1)
    if unbiased:
        rx, ry = kb.diagonal(dim1=1, dim2=2), lb.diagonal(dim1=1, dim2=2)
        sx, sy = rx.sum(dim=1), ry.sum(dim=1)
        c1, c2 = cnt / (cnt - 2), 1 / ((cnt - 1) * (cnt - 2))
        h = h + torch.stack(
            [
                c2 * sx * sx - c1 * (rx * rx).sum(dim=1),
                c2 * sx * sy - c1 * (rx * ry).sum(dim=1),
                c2 * sy * sy - c1 * (ry * ry).sum(dim=1),
            ],
            dim=1,
        )
    loss = (1 - _torch._cosine(h)[0]).mean().to(student.dtype)
    return loss, (mu_x, s_x, mu_y, s_y, kb, empty, lb, h)


# Backward (N x N form). For ℓ(P_xx, P_xy, P_yy) with partials a, b, c (per item; ×grad/B):
#   G = ∂ℓ/∂X̄ = S X̄,   S = 4a K̄ + 2b L̄   (gram: S = 4a(K̄ − L̄), the saved first slot)
# plus, for unbiased CKA, the row term diag(β) X̄ (β_i from ρ = diag K̄, torch_impl._hsic1_row_scale):
#   S_u = S + diag(βw). Every term of S_u is 0 on masked rows and columns, so S_u W = S_u.
# 'frob' (X̄ = W(X − 1μᵀ)/s):  g = (G − τX̄)/s,  τ = [s > EPS]⟨G, X̄⟩ = ⟨S_u, K̄⟩   (N x N only)
#   => g = (S_u − τW) W(X − 1μᵀ) / s².
# centring step: ∂ℓ/∂x_j = g_j − w_j Σ_i g_i / n. 1ᵀK̄ = 1ᵀL̄ = 0 (centred) and Σ w(x − μ) = 0
#   leave 1ᵀg = (βw)ᵀ(X − 1μᵀ)/s², so the step is the rank-1 term −w(βw)ᵀ/n (unbiased only).
#   => dX = W T W(X − 1μᵀ),  T = (S_u − τ diag(w) − w(βw)ᵀ/n) / s²        (s = 1, τ = 0 without 'frob')
# 'row' (relation, no centring; x̄_i = w_i x_i / r_i): g_i = (G_i − t_i x̄_i)/r_i with
#   t_i = [r_i > EPS]⟨G_i, x̄_i⟩ = [r_i > EPS] Σ_j S_ij K̄_ij, so
#   => dX = W T W X,  T = D_r⁻¹ (S − diag(t)) D_r⁻¹      (the per-row projection without a pass over X)
def _nn_backward(kind, grad, student, teacher, mask, saved, center, norm, unbiased, need_x, need_y):
    mu_x, s_x, mu_y, s_y, m_xx, _, m_yy, h = saved
    x, y, w = _g._views(student, teacher, mask)
    bsz, n = x.shape[0], x.shape[1]
    wv = _weights(w, bsz, n, x.device)
    gscale = grad.to(torch.float32) / bsz
    if kind == "gram":
        kb, lb = m_xx + m_yy, m_yy  # K̄ = (K̄ − L̄) + L̄
        a = c = gscale.expand(bsz)
        b = -2 * a
    else:
        kb, lb = m_xx, m_yy
        kappa, inv = _torch._cosine(h)
        ok = inv > 0
        hxx, _, hyy = h.unbind(dim=1)
        one = torch.ones_like(hxx)
        a = gscale * torch.where(ok, kappa / (2 * torch.where(ok, hxx, one)), 0 * one)
        c = gscale * torch.where(ok, kappa / (2 * torch.where(ok, hyy, one)), 0 * one)
        b = -gscale * inv
    a3, b3, c3 = a[:, None, None], b[:, None, None], c[:, None, None]
    betas = (None, None)
    if kind == "cka" and unbiased:
        cnt = wv.sum(dim=1)
        rx, ry = kb.diagonal(dim1=1, dim2=2), lb.diagonal(dim1=1, dim2=2)
        sx, sy = rx.sum(dim=1), ry.sum(dim=1)
        c1, c2 = cnt / (cnt - 2), 1 / ((cnt - 1) * (cnt - 2))
        betas = (
            _torch._hsic1_row_scale(a, b, c1, c2, rx, ry, sx, sy)[..., 0] * wv,  # βw for X
            _torch._hsic1_row_scale(c, b, c1, c2, ry, rx, sy, sx)[..., 0] * wv,  # βw for Y
        )
    out = []
    sides = (
        (need_x, x, mu_x, s_x, kb, student, betas[0], (4 * a3) * m_xx if kind == "gram" else None, a3, lb),
        (need_y, y, mu_y, s_y, lb, teacher, betas[1], (-4 * c3) * m_xx if kind == "gram" else None, c3, kb),
    )
    for need, z, mu, s, m_self, src, bw, s_gram, k_self, m_other in sides:
        if not need:
            out.append(src.new_empty(0))
            continue
        sm = s_gram if s_gram is not None else 4 * k_self * m_self + 2 * b3 * m_other  # S
        if norm == ROW:
            ok = s > EPS
            t_diag = torch.where(ok, (sm * m_self).sum(dim=2), torch.zeros_like(s))
            inv = 1 / s
            tm = (sm - torch.diag_embed(t_diag)) * _outer(inv, inv)
        else:
            if bw is not None:
                sm = sm + torch.diag_embed(bw)
            if norm == FROB:
                tau = torch.where(s > EPS, _torch._bdot(sm, m_self), torch.zeros_like(s))
                sm = sm - torch.diag_embed(tau[:, None] * wv)
            if bw is not None and center:
                sm = sm - _outer(wv, bw) / wv.sum(dim=1)[:, None, None]
            if norm == FROB:
                sm = sm / (s * s)[:, None, None]
            tm = sm
        out.append(_nn_grad(tm, z, w, mu if center else None, src.dtype).reshape(src.shape))
    return out[0], out[1]
