"""Triton kernels of the feature-geometry losses (gram, CKA, relation); math in docs/geometry.md
and the module docstring of kd_kernels/torch_impl/geometry.py (notation used below).

Launchers ``{gram,cka,relation}_{fwd,bwd}_triton`` implement the op contracts of
kd_kernels/ops/geometry.py: the torch_impl functions' arguments (minus ``form``), outputs,
dtypes and saved layout (μ_x, scale_x, μ_y, scale_y, M_xx, M_xy, M_yy, h).

D x D form (N > max(Ds, Dt), the token-feature case):

- forward: ONE streaming kernel (``_dd_products_kernel``) over row tiles computes per batch item
  the raw products XᵀWX, XᵀWY, YᵀWY (fp32 accumulators, ``tl.dot`` under the precision policy
  of docs/precision.md via ``_tiles.policy_dot``) plus the column sums Σ w x, Σ w y and the kept
  row count in the same pass. The grid is (output tiles of the three products, split-K programs
  over N, B); partial products are added with relaxed atomics into zeroed fp32 buffers. The mask
  is applied in the tile loads (no masked copy); centring is the rank-1 correction
  XᵀWX − n μμᵀ (no centred copy); 'frob' scaling uses the traces of the corrected products
  (‖X̃‖²_F = tr X̃ᵀX̃, no extra pass). 'row' scaling (relation) needs the row norms first: a light
  row pass (``_row_sq_kernel``) gives r_i, and the products kernel scales the rows in its loads.
  Unbiased CKA needs ρ_i = ‖x̄_i‖²: one light row pass with the column means.
  The D x D / scalar epilogues (h, the loss) are torch ops on the small matrices: no host sync.
- backward: one streaming GEMM pass (``_dd_grad_kernel``) dX = W[(X − 1μᵀ)P'' + (Y − 1μyᵀ)Q'']
  with P'', Q'' the small D x D matrices that fold the loss derivative and the whole chain rule
  of the preprocessing (derivation above ``_dd_backward``). Relation's per-row projection and
  unbiased CKA's row-scaling terms are finished with torch ops on [B, N, D] (see "Left").

N x N form (N <= max(Ds, Dt)): kd_kernels/triton/geometry_nn.py (``_nn_forward`` /
``_nn_backward``, called by the launchers below; the torch path's N x N saved layout). There the
relation projection and the unbiased CKA row terms are folded into the N x N matrix of the
backward GEMM (nothing is left as torch ops on [B, N, D]).

Left (documented, correct but not yet fused): relation's backward projection
g_i − ⟨g_i, x̄_i⟩x̄_i and unbiased CKA's backward row terms run as torch ops on [B, N, D]
temporaries; fp16/bf16 backward tiles are upcast to fp32 (PREC dot) so P'' keeps fp32 accuracy.
Procrustes: kd_kernels/triton/procrustes.py (this module's ``_products`` / ``_grad_gemm``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kd_kernels._backend import TRITON_INTERPRET
from kd_kernels.torch_impl import geometry as _torch
from kd_kernels.triton._tiles import dot_precision, policy_dot

__all__ = [
    "GEOMETRY_CONFIGS",
    "cka_bwd_triton",
    "cka_fwd_triton",
    "gram_bwd_triton",
    "gram_fwd_triton",
    "relation_bwd_triton",
    "relation_fwd_triton",
]

EPS = _torch.EPS
FROB, ROW, NONE = _torch.FROB, _torch.ROW, _torch.NONE

# BLOCK_D: output tile (D x D products, and the backward's output columns); BLOCK_N: rows per
# tl.dot step (the reduction dimension of XᵀX); BLOCK_K: the backward's D chunk; ROWS: rows per
# split-K program in the interpreter (so the small tests span several programs); on a GPU the
# split is sized to fill the device (``_split``). BLOCK_R: rows of the row-norm pass and of the
# backward's tiles. Why (compile gate, benchmarks/compile_gate.py): the backward runs fp32
# operands (3xTF32 splits in registers) into a 64 x 64 accumulator; BLOCK_K = 32 with 4 warps
# spilled on sm_80, BLOCK_K = 16 with 8 warps ("f32_warps") does not. The products kernel with
# 'row' scaling also has fp32 operands (the scaled rows): BLOCK_N = 32 spilled 36-60 B on sm_80
# (bf16 input, 4 or 8 warps), so it steps BLOCK_N_ROW = 16 rows; so does fp32 input with 3xTF32
# (three dots per step: BLOCK_N = 32 spilled 168-204 B on sm_80, odd shapes, with 4 warps, 32-36 B
# with 8).
# maxnreg=255 as the logit kernels (ptxas's occupancy
# heuristic otherwise caps registers and spills).
GEOMETRY_CONFIGS = {
    "gpu": {
        "BLOCK_D": 64, "BLOCK_N": 32, "BLOCK_N_ROW": 16, "BLOCK_K": 16, "BLOCK_R": 64,
        "num_warps": 4, "f32_warps": 8, "num_stages": 2, "maxnreg": 255,
    },
    "interpret": {
        "BLOCK_D": 32, "BLOCK_N": 16, "BLOCK_N_ROW": 16, "BLOCK_K": 32, "BLOCK_R": 32, "ROWS": 32,
        "num_warps": 1, "num_stages": 1,
    },
}  # fmt: skip


def _config() -> dict:
    return GEOMETRY_CONFIGS["interpret" if TRITON_INTERPRET else "gpu"]


def _launch_opts(cfg: dict, warps: str = "num_warps") -> dict:
    opts = {"num_warps": cfg.get(warps, cfg["num_warps"]), "num_stages": cfg["num_stages"]}
    if "maxnreg" in cfg:
        opts["maxnreg"] = cfg["maxnreg"]
    return opts


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _row_sq_kernel(
    x_ptr,  # [B, N, D] features
    w_ptr,  # [B, N] int8 row mask (read when HAS_MASK)
    mu_ptr,  # [B, D] fp32 column means (read when HAS_MU)
    out_ptr,  # [B, N] fp32 out: w_i ‖x_i − μ‖²
    N,
    D,
    stride_b,
    stride_n,
    stride_d,
    HAS_MASK: tl.constexpr,
    HAS_MU: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = offs_r < N
    if HAS_MASK:
        keep = tl.load(w_ptr + b * N + offs_r, mask=in_r, other=0) != 0
        in_r = in_r & keep
    rows = b * stride_b + offs_r.to(tl.int64) * stride_n
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < D
        m = in_r[:, None] & in_k[None, :]
        x = tl.load(x_ptr + rows[:, None] + offs_k.to(tl.int64)[None, :] * stride_d, mask=m, other=0.0)
        x = x.to(tl.float32)
        if HAS_MU:
            mu = tl.load(mu_ptr + b * D + offs_k, mask=in_k, other=0.0)
            x = tl.where(m, x - mu[None, :], 0.0)
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + b * N + offs_r, acc, mask=offs_r < N)


@triton.jit
def _load_rows(
    a_ptr, rows, offs_c, in_r, C, stride_c, rmul, sh_ptr,
    ROW_SCALE: tl.constexpr, MUL: tl.constexpr, SHIFT: tl.constexpr,
):  # fmt: skip
    # The [R, BLOCK] tile a[rows, offs_c] (0 out of bounds), then one of
    #   ROW_SCALE: a_r · rmul_r in fp32 (row scaling, or the backward's 0/1 weights);
    #   SHIFT:     (a_r − sh) · rmul_r (sh [C] fp32 per-column shift, rmul the 0/1 mask), rounded
    #              back to the input dtype (the MMA operand; fp32 inputs unchanged);
    #   MUL:       a_r · rmul_r (the 0/1 mask) in the input dtype (exact);
    # else the tile as loaded. ROW_SCALE and SHIFT may be combined (fp32 result).
    in_c = offs_c < C
    m = in_r[:, None] & in_c[None, :]
    a = tl.load(a_ptr + rows[:, None] + offs_c.to(tl.int64)[None, :] * stride_c, mask=m, other=0.0)
    if SHIFT:
        sh = tl.load(sh_ptr + offs_c, mask=in_c, other=0.0)
        a32 = (a.to(tl.float32) - sh[None, :]) * rmul[:, None]
        if ROW_SCALE:
            a = a32
        else:
            a = a32.to(a.dtype)
    elif ROW_SCALE:
        a = a.to(tl.float32) * rmul[:, None]
    elif MUL:
        a = (a.to(tl.float32) * rmul[:, None]).to(a.dtype)  # exact (0/1); bf16 math is unreliable in the interpreter
    return a


# Forward products, per batch item b and output tile (i, j) of one of the three products:
#   M[i, j] += Σ_{rows of this split} a_r[i] w_r b_r[j]     (a, b ∈ {x, y}; relaxed atomics)
#   colsum_a[i] += Σ w_r a_r[i]   (with SHIFT, a_r = x_r − c_x: the shifted rows throughout)
#   (programs with j = 0 of XᵀX and YᵀY);  count += Σ w_r   (XᵀX (0, 0))
# With ROW_SCALE, a_r and b_r are the rows divided by their norms (relation's 'row' scaling).
@triton.jit
def _dd_products_kernel(
    x_ptr,  # [B, N, Ds] student
    y_ptr,  # [B, N, Dt] teacher (same dtype as x)
    w_ptr,  # [B, N] int8 row mask (HAS_MASK)
    rx_ptr,  # [B, N] fp32 1 / r_x (ROW_SCALE)
    ry_ptr,  # [B, N] fp32 1 / r_y (ROW_SCALE)
    mxx_ptr,  # [B, Ds, Ds] fp32 zeroed out
    mxy_ptr,  # [B, Ds, Dt] fp32 zeroed out
    myy_ptr,  # [B, Dt, Dt] fp32 zeroed out
    csx_ptr,  # [B, Ds] fp32 zeroed out: Σ w (x − c_x)
    csy_ptr,  # [B, Dt] fp32 zeroed out: Σ w (y − c_y)
    shx_ptr,  # [B, Ds] fp32 shift c_x (SHIFT): a kept row of x, so that the rank-1 centring
    shy_ptr,  # [B, Dt] fp32 shift c_y     correction does not cancel large column means
    cnt_ptr,  # [B] fp32 zeroed out: Σ w
    N,
    Ds,
    Dt,
    sxb,  # batch / row strides of x and y (unit column stride: the launcher ensures it)
    sxn,
    syb,
    syn,
    rows_per_split,  # rows per split-K program (a multiple of BLOCK_N)
    HAS_MASK: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    SHIFT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ts = tl.cdiv(Ds, BLOCK_D)
    tt = tl.cdiv(Dt, BLOCK_D)
    # decode the product: [0, ts²) XᵀX, [ts², ts² + ts·tt) XᵀY, then YᵀY. Only the pointers are
    # assigned in the branches (same types); the scalars are selected arithmetically, so a
    # stride or width that Triton specialises (== 1) cannot give mismatched branch types.
    if pid < ts * ts:
        a_ptr = x_ptr
        c_ptr = x_ptr
        ra_ptr = rx_ptr
        rc_ptr = rx_ptr
        m_ptr = mxx_ptr
        cs_ptr = csx_ptr
        sa_ptr = shx_ptr
        sc_ptr = shx_ptr
    elif pid < ts * ts + ts * tt:
        a_ptr = x_ptr
        c_ptr = y_ptr
        ra_ptr = rx_ptr
        rc_ptr = ry_ptr
        m_ptr = mxy_ptr
        cs_ptr = csx_ptr
        sa_ptr = shx_ptr
        sc_ptr = shy_ptr
    else:
        a_ptr = y_ptr
        c_ptr = y_ptr
        ra_ptr = ry_ptr
        rc_ptr = ry_ptr
        m_ptr = myy_ptr
        cs_ptr = csy_ptr
        sa_ptr = shy_ptr
        sc_ptr = shy_ptr
    which = (pid >= ts * ts).to(tl.int32) + (pid >= ts * ts + ts * tt).to(tl.int32)
    a_y = (which == 2).to(tl.int64)  # left operand is y
    c_y = (which >= 1).to(tl.int64)  # right operand is y
    q = pid - (which >= 1).to(tl.int32) * (ts * ts) - (which == 2).to(tl.int32) * (ts * tt)
    ncol = ts + (tt - ts) * (which >= 1).to(tl.int32)  # column tiles of this product
    ti = q // ncol
    tj = q % ncol
    sab = sxb + (syb - sxb) * a_y
    san = sxn + (syn - sxn) * a_y
    scb = sxb + (syb - sxb) * c_y
    scn = sxn + (syn - sxn) * c_y
    Da = Ds + (Dt - Ds) * (which == 2).to(tl.int32)
    Dc = Ds + (Dt - Ds) * (which >= 1).to(tl.int32)
    offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    cs = tl.zeros([BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_N], dtype=tl.float32)
    r_begin = split * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, N)
    for r0 in range(r_begin, r_end, BLOCK_N):
        offs_r = r0 + tl.arange(0, BLOCK_N)
        in_b = offs_r < r_end
        keep = in_b
        if HAS_MASK:
            keep = in_b & (tl.load(w_ptr + b * N + offs_r, mask=in_b, other=0) != 0)
        # masked rows are read and multiplied by 0 (not skipped): a NaN/inf in a masked-out row
        # still reaches the loss, as x·w does on the torch path (README "Non-finite input")
        ra = keep.to(tl.float32)
        rc = ra
        if ROW_SCALE:
            ra = tl.load(ra_ptr + b * N + offs_r, mask=keep, other=0.0)
            rc = tl.load(rc_ptr + b * N + offs_r, mask=keep, other=0.0)
        a = _load_rows(
            a_ptr + b * sab, offs_r.to(tl.int64) * san, offs_i, in_b, Da, 1, ra, sa_ptr + b * Da,
            ROW_SCALE, HAS_MASK, SHIFT,
        )  # fmt: skip
        c = _load_rows(
            c_ptr + b * scb, offs_r.to(tl.int64) * scn, offs_j, in_b, Dc, 1, rc, sc_ptr + b * Dc,
            ROW_SCALE, HAS_MASK, SHIFT,
        )  # fmt: skip
        acc = policy_dot(tl.trans(a), c, acc, PREC)
        cs += tl.sum(a.to(tl.float32), axis=0)
        cnt += keep.to(tl.float32)
    mi = offs_i < Da
    mj = offs_j < Dc
    ptrs = m_ptr + b * Da * Dc + offs_i[:, None] * Dc + offs_j[None, :]
    tl.atomic_add(ptrs, acc, mask=mi[:, None] & mj[None, :], sem="relaxed")
    if (which != 1) & (tj == 0):
        tl.atomic_add(cs_ptr + b * Da + offs_i, cs, mask=mi, sem="relaxed")
    if (which == 0) & (ti == 0) & (tj == 0):
        tl.atomic_add(cnt_ptr + b, tl.sum(cnt, axis=0), sem="relaxed")


# Backward GEMM pass, per batch item b, row tile and output column tile:
#   out[r, c] = w_r ( Σ_k a_r[k] P[k, c] + Σ_k v_r[k] Q[k, c] )
# a = x (rows times rinv_x with ROW_SCALE; x − μ_x with CENTER: centred in the loads, so the
# centring term u = P''ᵀμ_x + Q''ᵀμ_y below is never formed and cannot cancel), v = y likewise;
# P [B, Da, Dout], Q [B, Dv, Dout] fp32. OUT_F32: out is an fp32 buffer (the launcher finishes it), else out's dtype.
@triton.jit
def _dd_grad_kernel(
    a_ptr,
    v_ptr,
    w_ptr,
    ra_ptr,
    rv_ptr,
    p_ptr,
    q_ptr,
    mua_ptr,  # [B, Da] fp32 column means of a (CENTER)
    muv_ptr,  # [B, Dv] fp32 column means of v (CENTER)
    out_ptr,  # [B, N, Dout] contiguous
    N,
    Da,
    Dv,
    Dout,
    sab,
    san,
    sad,
    svb,
    svn,
    svd,
    HAS_MASK: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    CENTER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_D + tl.arange(0, BLOCK_D)
    in_r = offs_r < N
    if HAS_MASK:
        in_r = in_r & (tl.load(w_ptr + b * N + offs_r, mask=in_r, other=0) != 0)
    ra = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
    rv = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
    if ROW_SCALE:
        ra = tl.load(ra_ptr + b * N + offs_r, mask=in_r, other=0.0)
        rv = tl.load(rv_ptr + b * N + offs_r, mask=in_r, other=0.0)
    in_c = offs_c < Dout
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, Da, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # fp32 operands (fp16/bf16 tiles upcast): P keeps fp32 accuracy (PREC dot)
        a = _load_rows(
            a_ptr + b * sab, offs_r.to(tl.int64) * san, offs_k, in_r, Da, sad, ra, mua_ptr + b * Da, True, False, CENTER
        )  # fmt: skip
        pm = (offs_k < Da)[:, None] & in_c[None, :]
        p = tl.load(p_ptr + b * Da * Dout + offs_k[:, None] * Dout + offs_c[None, :], mask=pm, other=0.0)
        acc = policy_dot(a, p, acc, PREC)
    for k0 in range(0, Dv, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        v = _load_rows(
            v_ptr + b * svb, offs_r.to(tl.int64) * svn, offs_k, in_r, Dv, svd, rv, muv_ptr + b * Dv, True, False, CENTER
        )  # fmt: skip
        qm = (offs_k < Dv)[:, None] & in_c[None, :]
        q = tl.load(q_ptr + b * Dv * Dout + offs_k[:, None] * Dout + offs_c[None, :], mask=qm, other=0.0)
        acc = policy_dot(v, q, acc, PREC)
    acc = acc * in_r.to(tl.float32)[:, None]  # w ⊙ (…): NaN stats stay NaN in masked rows, as torch
    optrs = out_ptr + b * N * Dout + offs_r.to(tl.int64)[:, None] * Dout + offs_c[None, :]
    tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_r < N)[:, None] & in_c[None, :])


# ---------------------------------------------------------------------------------- launchers


def _views(student, teacher, mask):
    """3-D views (no copy), the int8 row mask [B, N] or None."""
    x = student if student.dim() == 3 else student[None]
    y = teacher if teacher.dim() == 3 else teacher[None]
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    # unit column stride (vector loads; a transposed view is copied once)
    x = x if x.stride(2) == 1 else x.contiguous()
    y = y if y.stride(2) == 1 else y.contiguous()
    w = None if mask is None else (mask.reshape(x.shape[0], x.shape[1]) != 0).to(torch.int8)
    return x, y, w


def _row_sq(x, w, mu):
    """w_i ‖x_i − μ‖² as [B, N] fp32 (μ [B, D] or None): one light pass over the rows."""
    cfg = _config()
    bsz, n, d = x.shape
    out = torch.empty(bsz, n, device=x.device, dtype=torch.float32)
    dummy = out
    grid = (triton.cdiv(n, cfg["BLOCK_R"]), bsz)
    _row_sq_kernel[grid](
        x, dummy if w is None else w, dummy if mu is None else mu, out, n, d, *x.stride(),
        HAS_MASK=w is not None, HAS_MU=mu is not None, BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
        **_launch_opts(cfg),
    )  # fmt: skip
    return out


def _split(n: int, tiles: int, bsz: int, cfg: dict) -> int:
    """Rows per split-K program: interpreter ``ROWS``; GPU: enough programs to fill ~2 waves."""
    bn = cfg["BLOCK_N"]
    if "ROWS" in cfg:
        return cfg["ROWS"]
    target = 264
    splits = max(1, min(triton.cdiv(n, bn), triton.cdiv(target, tiles * bsz)))
    return triton.cdiv(triton.cdiv(n, splits), bn) * bn


def _products(x, y, w, rinv_x, rinv_y, shift=None):
    """XᵀWX, XᵀWY, YᵀWY (rows scaled by rinv when given; rows minus the per-item shifts
    shift = (c_x [B, Ds], c_y [B, Dt]) when given), the column sums of the same rows, Σ w (fp32)."""
    cfg = _config()
    bsz, n, ds = x.shape
    dt = y.shape[2]
    f32 = {"device": x.device, "dtype": torch.float32}
    mxx, mxy, myy = torch.zeros(bsz, ds, ds, **f32), torch.zeros(bsz, ds, dt, **f32), torch.zeros(bsz, dt, dt, **f32)
    csx, csy, cnt = torch.zeros(bsz, ds, **f32), torch.zeros(bsz, dt, **f32), torch.zeros(bsz, **f32)
    bd = cfg["BLOCK_D"]
    ts, tt = triton.cdiv(ds, bd), triton.cdiv(dt, bd)
    tiles = ts * ts + ts * tt + tt * tt
    rows = _split(n, tiles, bsz, cfg)
    grid = (tiles, triton.cdiv(n, rows), bsz)
    row = rinv_x is not None
    prec = dot_precision()
    _dd_products_kernel[grid](
        x, y, cnt if w is None else w, rinv_x if row else cnt, rinv_y if row else cnt,
        mxx, mxy, myy, csx, csy, cnt if shift is None else shift[0], cnt if shift is None else shift[1], cnt,
        n, ds, dt, x.stride(0), x.stride(1), y.stride(0), y.stride(1), rows,
        HAS_MASK=w is not None, ROW_SCALE=row, SHIFT=shift is not None, BLOCK_D=bd,
        BLOCK_N=cfg["BLOCK_N_ROW" if row or (x.dtype == torch.float32 and prec == "tf32x3") else "BLOCK_N"],
        PREC=prec, **_launch_opts(cfg),
    )  # fmt: skip
    return mxx, mxy, myy, csx, csy, cnt


def _grad_gemm(a, v, w, ra, rv, p, q, mu, out_dtype):
    """W ((A − 1μ_aᵀ) P + (V − 1μ_vᵀ) Q) as [B, N, Dout] in ``out_dtype`` (rows of A, V scaled by
    ra, rv when given; mu = (μ_a, μ_v) or None)."""
    cfg = _config()
    bsz, n, da = a.shape
    dout = p.shape[2]
    out = torch.empty(bsz, n, dout, device=a.device, dtype=out_dtype)
    row = ra is not None
    bd = cfg["BLOCK_D"]
    grid = (triton.cdiv(n, cfg["BLOCK_R"]), triton.cdiv(dout, bd), bsz)
    _dd_grad_kernel[grid](
        a, v, p if w is None else w, ra if row else p, rv if row else p, p.contiguous(), q.contiguous(),
        p if mu is None else mu[0].contiguous(), p if mu is None else mu[1].contiguous(), out, n, da, v.shape[2],
        dout, *a.stride(), *v.stride(), HAS_MASK=w is not None, ROW_SCALE=row, CENTER=mu is not None, BLOCK_R=cfg["BLOCK_R"], BLOCK_D=bd,
        BLOCK_K=cfg["BLOCK_K"], PREC=dot_precision(), **_launch_opts(cfg, "f32_warps"),
    )  # fmt: skip
    return out


def _shifts(x, y, w):
    """Per-item shifts (c_x, c_y) [B, D] fp32: the first kept row (row 0 without a mask); a
    gather of B rows, no host sync."""
    idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if w is None else w.argmax(dim=1)
    ar = torch.arange(x.shape[0], device=x.device)
    return x[ar, idx].float().contiguous(), y[ar, idx].float().contiguous()


def _frob_sq(m):
    return m.square().sum(dim=(1, 2))


def _dd_forward(kind, student, teacher, mask, center, norm, unbiased, prims=None):
    # prims: (products, grad_gemm, row_sq) with the signatures of _products, _grad_gemm, _row_sq;
    # None = these Triton ones (kd_kernels/ops/geometry_cuda.py passes the CUDA C++ ones)
    products, _, row_sq = prims or (_products, _grad_gemm, _row_sq)
    x, y, w = _views(student, teacher, mask)
    empty = x.new_empty(0, dtype=torch.float32)
    rinv_x = rinv_y = None
    s_x, s_y = empty, x.new_empty(0, dtype=torch.float32)
    if norm == ROW:  # relation: r_i = max(‖x_i‖, EPS) (kept rows; masked rows give EPS as torch)
        s_x = row_sq(x, w, None).sqrt().clamp_min(EPS)
        s_y = row_sq(y, w, None).sqrt().clamp_min(EPS)
        rinv_x, rinv_y = 1 / s_x, 1 / s_y
    # fp32 only: a shifted 16-bit tile would be rounded back to its dtype (an error the exact
    # 16-bit products do not have), while the unshifted correction's loss, eps_fp32·‖μ‖²/var,
    # stays below the input's own quantisation eps_16·‖μ‖/σ until ‖μ‖/σ ~ eps_16/eps_fp32 (2^13+)
    shift = _shifts(x, y, w) if center and x.dtype == torch.float32 else None
    mxx, mxy, myy, csx, csy, cnt = products(x, y, w, rinv_x, rinv_y, shift)
    n = cnt[:, None, None]
    mu_x, mu_y = empty.clone(), empty.clone()
    if center:
        # with X' = X − 1cᵀ (c a kept row: the shift keeps the correction from cancelling large
        # means) and δ = Σ w x' / n:  Σ w (x − μ)(y − μ_y)ᵀ = X'ᵀWY' − n δ_x δ_yᵀ,  μ = c + δ
        d_x, d_y = csx / cnt[:, None], csy / cnt[:, None]
        mu_x, mu_y = (d_x, d_y) if shift is None else (shift[0] + d_x, shift[1] + d_y)
        mxx = mxx - n * d_x[:, :, None] * d_x[:, None, :]
        mxy = mxy - n * d_x[:, :, None] * d_y[:, None, :]
        myy = myy - n * d_y[:, :, None] * d_y[:, None, :]
    if norm == FROB:  # ‖X̃‖_F² = tr X̃ᵀX̃
        s_x = mxx.diagonal(dim1=1, dim2=2).sum(dim=1).clamp_min(0).sqrt().clamp_min(EPS)
        s_y = myy.diagonal(dim1=1, dim2=2).sum(dim=1).clamp_min(0).sqrt().clamp_min(EPS)
        mxx = mxx / (s_x * s_x)[:, None, None]
        mxy = mxy / (s_x * s_y)[:, None, None]
        myy = myy / (s_y * s_y)[:, None, None]
    h = torch.stack([_frob_sq(mxx), _frob_sq(mxy), _frob_sq(myy)], dim=1)
    if kind == "gram":
        per_item = h[:, 0] - 2 * h[:, 1] + h[:, 2]
    else:
        if unbiased:
            rx, ry = _rho(x, y, w, mu_x, mu_y, s_x, s_y, row_sq)
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
        per_item = 1 - _torch._cosine(h)[0]
    loss = per_item.mean().to(student.dtype)
    return loss, (mu_x, s_x, mu_y, s_y, mxx, mxy, myy, h)


def _rho(x, y, w, mu_x, mu_y, s_x, s_y, row_sq=None):
    """ρ_i = ‖x̄_i‖² = w_i ‖x_i − μ_x‖² / s_x² (and ρ_y): the row pass of unbiased CKA."""
    row_sq = row_sq or _row_sq
    rx = row_sq(x, w, mu_x) / (s_x * s_x)[:, None]
    ry = row_sq(y, w, mu_y) / (s_y * s_y)[:, None]
    return rx, ry


# Backward (D x D form). For ℓ(P_xx, P_xy, P_yy) with a, b, c (per item):
#   G = ∂ℓ/∂X̄ = X̄ P + Ȳ Q,   P = 4a B̄ [Ds, Ds],  Q = 2b Āᵀ [Dt, Ds],
# and X̄ = W (X − 1μᵀ) / s ('frob'; s = 1 for no scaling, μ = 0 without centring). Then
#   G = W [(X − 1μᵀ) P / s_x + (Y − 1μ_yᵀ) Q / s_y].
# 'frob' chain: g = (G − τ X̄) / s_x with τ = [s_x > EPS] ⟨G, X̄⟩ and
#   ⟨G, X̄⟩ = tr(X̄ᵀX̄ P) + tr(X̄ᵀȲ Q) = ⟨B̄, Pᵀ⟩ + ⟨Ā, Qᵀ⟩     (D x D only: no pass over X)
# so g = W [(X − 1μᵀ) P'' + (Y − 1μ_yᵀ) Q''] with P'' = (P − τ I) / s_x², Q'' = Q / (s_x s_y).
# Centring chain: ∂ℓ/∂x_j = g_j − w_j Σ_i g_i / n, and Σ_i g_i = 0 because Σ_i w_i (x_i − μ) = 0:
# the centring term vanishes. Hence one GEMM pass on the rows centred in the loads:
#   dX = W ((X − 1μ_xᵀ) P'' + (Y − 1μ_yᵀ) Q'')   (= W (X P'' + Y Q'' − 1uᵀ), u = P''ᵀμ_x + Q''ᵀμ_y).
# Unbiased CKA adds diag(β) X̄ to G (β_i from ρ, torch_impl._hsic1_row_scale): τ gains Σ β_i ρ_i,
# and dX gains W[diag(β)(X − 1μᵀ)/s² − 1 mβᵀ] with mβ = Σ_i w_i β_i (x_i − μ) / (s² n).
def _dd_backward(kind, grad, student, teacher, mask, saved, center, norm, unbiased, need_x, need_y, prims=None):
    _, grad_gemm, row_sq = prims or (_products, _grad_gemm, _row_sq)  # prims: see _dd_forward
    mu_x, s_x, mu_y, s_y, mxx, mxy, myy, h = saved
    x, y, w = _views(student, teacher, mask)
    bsz, nrows = x.shape[0], x.shape[1]
    gscale = grad.to(torch.float32) / bsz
    if kind == "gram":
        a = c = gscale.expand(bsz)
        b = -2 * a
    else:
        kappa, inv = _torch._cosine(h)
        ok = inv > 0
        hxx, _, hyy = h.unbind(dim=1)
        one = torch.ones_like(hxx)
        a = gscale * torch.where(ok, kappa / (2 * torch.where(ok, hxx, one)), 0 * one)
        c = gscale * torch.where(ok, kappa / (2 * torch.where(ok, hyy, one)), 0 * one)
        b = -gscale * inv
    a3, b3, c3 = a[:, None, None], b[:, None, None], c[:, None, None]
    extra = None
    if kind == "cka" and unbiased:
        cnt = nrows * torch.ones(bsz, device=x.device) if w is None else w.sum(dim=1).float()
        rx, ry = _rho(x, y, w, mu_x, mu_y, s_x, s_y, row_sq)
        sx, sy = rx.sum(dim=1), ry.sum(dim=1)
        c1, c2 = cnt / (cnt - 2), 1 / ((cnt - 1) * (cnt - 2))
        extra = (
            _torch._hsic1_row_scale(a, b, c1, c2, rx, ry, sx, sy)[..., 0],  # β_x [B, N]
            _torch._hsic1_row_scale(c, b, c1, c2, ry, rx, sy, sx)[..., 0],  # β_y
            rx,
            ry,
            cnt,
        )
    out = []
    for need, (z, o, mu, mu_o, s, s_o, m_self, m_cross, k_self, k_cross, src) in (
        (need_x, (x, y, mu_x, mu_y, s_x, s_y, mxx, mxy.transpose(1, 2), a3, b3, student)),
        (need_y, (y, x, mu_y, mu_x, s_y, s_x, myy, mxy, c3, b3, teacher)),
    ):
        if not need:
            out.append(src.new_empty(0))
            continue
        p = 4 * k_self * m_self  # [B, D, D]
        q = 2 * k_cross * m_cross  # [B, Do, D]: Āᵀ for X (its Q), Ā for Y
        # (the cross matrix of the other side: ⟨Ā, Qᵀ⟩ uses the product as seen from this side)
        cross = mxy if z is x else mxy.transpose(1, 2)  # X̄ᵀȲ for X, ȲᵀX̄ for Y
        if norm == ROW:
            g = grad_gemm(z, o, w, 1 / s, 1 / s_o, p, q, None, torch.float32)
            zb = z.float() * (1 / s)[..., None]
            if w is not None:
                zb = zb * w[..., None]
            dot = (g * zb).sum(dim=2, keepdim=True)
            r = s[..., None]
            g = (g - torch.where(r > EPS, dot, torch.zeros_like(dot)) * zb) / r
            out.append(g.to(src.dtype).reshape(src.shape))
            continue
        frob = norm == FROB
        one = torch.ones_like(gscale).expand(bsz)
        sx_, so_ = (s, s_o) if frob else (one, one)
        beta = None
        if extra is not None:
            beta = extra[0] if z is x else extra[1]
            rho = extra[2] if z is x else extra[3]
        if frob:
            tau = (m_self * p.transpose(1, 2)).sum(dim=(1, 2)) + (cross * q.transpose(1, 2)).sum(dim=(1, 2))
            if beta is not None:
                tau = tau + (beta * rho).sum(dim=1)
            tau = torch.where(s > EPS, tau, torch.zeros_like(tau))
            eye = torch.eye(p.shape[1], device=p.device, dtype=p.dtype)
            p2 = (p - tau[:, None, None] * eye) / (sx_ * sx_)[:, None, None]
        else:
            p2 = p / (sx_ * sx_)[:, None, None]
        q2 = q / (sx_ * so_)[:, None, None]
        cen = (mu, mu_o) if center else None
        if beta is None:
            out.append(grad_gemm(z, o, w, None, None, p2, q2, cen, src.dtype).reshape(src.shape))
            continue
        g = grad_gemm(z, o, w, None, None, p2, q2, cen, torch.float32)
        # unbiased row terms: W[diag(β)(Z − 1μᵀ)/s² − 1 mβᵀ]  (torch ops on [B, N, D], see "Left")
        wv = torch.ones(bsz, nrows, device=z.device) if w is None else w.float()
        e = (beta * wv / (sx_ * sx_)[:, None])[..., None]  # [B, N, 1]
        zc = z.float() - mu[:, None, :] if center else z.float()
        term = e * zc
        if center:
            term = term - wv[..., None] * term.sum(dim=1, keepdim=True) / extra[4][:, None, None]
        out.append((g + term).to(src.dtype).reshape(src.shape))
    return out[0], out[1]


def _use_dd(student, teacher) -> bool:
    return _torch.choose_form(student.shape[-2], student.shape[-1], teacher.shape[-1]) == _torch.DD


def _nn():
    """kd_kernels/triton/geometry_nn.py (the N x N form; imported here, it imports this module)."""
    from kd_kernels.triton import geometry_nn

    return geometry_nn


# --------------------------------------------------------------------------- op contracts


def gram_fwd_triton(student, teacher, mask, center: bool, normalize: bool):
    if not _use_dd(student, teacher):  # N x N form: kd_kernels/triton/geometry_nn.py
        loss, saved = _nn()._nn_forward("gram", student, teacher, mask, center, FROB if normalize else NONE, False)
    else:
        loss, saved = _dd_forward("gram", student, teacher, mask, center, FROB if normalize else NONE, False)
    return (loss, *saved)


def gram_bwd_triton(grad, student, teacher, mask, *rest):
    saved, (center, normalize, need_x, need_y) = tuple(rest[:8]), rest[8:]
    norm = FROB if normalize else NONE
    if not _use_dd(student, teacher):
        return _nn()._nn_backward("gram", grad, student, teacher, mask, saved, center, norm, False, need_x, need_y)
    return _dd_backward("gram", grad, student, teacher, mask, saved, center, norm, False, need_x, need_y)


def cka_fwd_triton(student, teacher, mask, unbiased: bool):
    if not _use_dd(student, teacher):
        loss, saved = _nn()._nn_forward("cka", student, teacher, mask, True, FROB, unbiased)
    else:
        loss, saved = _dd_forward("cka", student, teacher, mask, True, FROB, unbiased)
    return (loss, *saved)


def cka_bwd_triton(grad, student, teacher, mask, *rest):
    saved, (unbiased, need_x, need_y) = tuple(rest[:8]), rest[8:]
    if not _use_dd(student, teacher):
        return _nn()._nn_backward("cka", grad, student, teacher, mask, saved, True, FROB, unbiased, need_x, need_y)
    return _dd_backward("cka", grad, student, teacher, mask, saved, True, FROB, unbiased, need_x, need_y)


def relation_fwd_triton(student, teacher, mask):
    if not _use_dd(student, teacher):
        loss, saved = _nn()._nn_forward("relation", student, teacher, mask, False, ROW, False)
    else:
        loss, saved = _dd_forward("relation", student, teacher, mask, False, ROW, False)
    return (loss, *saved)


def relation_bwd_triton(grad, student, teacher, mask, *rest):
    saved, (need_x, need_y) = tuple(rest[:8]), rest[8:]
    if not _use_dd(student, teacher):
        return _nn()._nn_backward("relation", grad, student, teacher, mask, saved, False, ROW, False, need_x, need_y)
    return _dd_backward("relation", grad, student, teacher, mask, saved, False, ROW, False, need_x, need_y)
