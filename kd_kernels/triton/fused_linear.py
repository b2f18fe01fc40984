"""Triton kernels of the fused-linear KD / JSD losses (``fused_linear_kd_loss``, ``fused_linear_jsd_loss``).

Op contracts: kd_kernels/ops/fused_linear.py (the launchers take the torch kernels' arguments in
the same order and return the same outputs). Math: the module docstring of
kd_kernels/torch_impl/fused_linear.py (the head's chain rule) and docs/logit.md sections 3-5 (the
divergences, their online log-sum-exp and their gradients); notation below as there
(u = z / T, l = u - lse, q = exp(l_s), p = exp(l_t)). The ``[N, V]`` logits never exist: every
kernel recomputes ``[BLOCK_M, BLOCK_V]`` logit tiles from the hidden states and the heads with
``tl.dot`` (tensor cores, docs/precision.md: fp16/bf16 operands in their dtype, fp32 through
``policy_dot``, fp32 accumulators) and keeps per-row statistics.

Forward (grid: row blocks x V splits; each program walks the V tiles split, split + P, ...):

- pass 1, ``_fused_linear_fwd_kernel``: per row the online log-sum-exp states (m_s, S_s),
  (m_t, S_t) and one cross term, rescaled by exp(m_old - m_new) when a running max grows:
  KD and forward KL (JSD beta = 0) ``A = sum exp(u_t - m_t)(u_t - u_s)``, so
  ``KL(p || q) = A / S_t - lse_t + lse_s``; reverse KL (beta = 1) the roles swapped,
  ``KL(q || p) = A / S_s - lse_s + lse_t``; JSD (0 < beta < 1) the two states only.
  Partial states per (row, split) ``[5, N, P]`` are merged by torch ops on ``[N, P]``
  (global max, every split rescaled to it; no host sync).
- pass 2 (JSD with 0 < beta < 1 only), ``_fused_linear_sums_kernel``: the logits once more, now
  with both lse known, ``K_t = KL(p || M)`` and ``K_s = KL(q || M)`` (log M by the guarded
  logaddexp of the logit kernels); ``row = beta K_t + (1 - beta) K_s``. log M needs both lse,
  so the second pass is the honest price (see FLOPs).

Backward (G = dL/dz per row and class, times grad_row; 0 on dropped rows even where NaN):

- kd / forward KL:  G_s = c (q - p),          G_t = c (p (l_t - l_s) - p K_t),  K_t = KL(p || q)
- reverse KL:       G_s = (q (l_s - l_t) - q K_s) / T,  K_s = KL(q || p);  G_t = (p - q) / T
- JSD:              G_s = (1 - beta)/T (q (l_s - log M) - q K_s),  G_t = beta/T (p (l_t - log M) - p K_t)

(c = T for kd, 1/T for forward KL; p (...) is 0 where p == 0, as torch_impl's ``_plog``). The row
scalars K (only where a requested gradient needs one: the teacher's for kd / forward KL, the
student's for reverse KL, JSD always) come from ``_fused_linear_sums_kernel`` over all rows
first (O(N) memory). Then the rows are processed in chunks of ``chunk`` rows (chunk x V <= the
config's CHUNK_ELEMENTS, a fixed budget independent of N): ``_fused_linear_bwd_kernel`` (grid:
row blocks of the chunk x V tiles) recomputes both logit tiles, forms G in fp32, adds its column
sums into the bias gradients (fp32, relaxed atomics) and writes G, rounded to the side's GEMM
dtype, into a ``[chunk, V]`` buffer; ``_fused_linear_gemm_kernel`` (a plain tiled ``tl.dot``
GEMM, tensor cores, not torch.matmul) then gives ``grad_h[chunk] = G W`` and accumulates
``grad_W += Gᵀ h[chunk]`` in fp32.

Memory: O(N) (lse, row scalars, split partials ``[5, N, P]``) + O(V·H) (fp32 weight-gradient
accumulators) + O(chunk·V) for G; never O(N·V).

FLOPs (GEMM work; the divergence is O(N·V)): one recomputation of both logits costs
``F = 2·N·V·(Hs + Ht)``.

- forward: kd and JSD's endpoints F (one pass); JSD with 0 < beta < 1 2F (LSE pass + value pass).
- backward: F (the G pass) + ``2·N·V·H`` per hidden / weight gradient needed, plus F for the row
  scalars when they are needed (kd / forward KL with a teacher gradient, reverse KL, JSD).
  The common kd student-only backward is ``F + 4·N·V·Hs``, as the PyTorch path; its
  recomputation overhead is F. JSD (0 < beta < 1) student-only: ``2F + 4·N·V·Hs``.

Deviations from the PyTorch path: the logits are fp32 accumulators (the PyTorch path rounds
fp16/bf16 logits to the input dtype), biases are added in fp32; G is rounded to the GEMM dtype
before the two backward GEMMs (the PyTorch path multiplies in fp32); the bias gradients sum G in
fp32 with atomics (summation order not fixed).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kd_kernels._backend import TRITON_INTERPRET
from kd_kernels.triton._tiles import dot_precision, policy_dot
from kd_kernels.triton.logit import _log_mix, _rescale

__all__ = [
    "FUSED_LINEAR_CONFIGS",
    "fused_linear_jsd_bwd_triton",
    "fused_linear_jsd_fwd_triton",
    "fused_linear_kd_bwd_triton",
    "fused_linear_kd_fwd_triton",
]

# Launch configurations (the launchers and the compile gate read this table).
# BLOCK_M x BLOCK_V: logit tile per step; two fp32 accumulators (student, teacher) and the
#   elementwise terms are live at once: 64 x 64 with 8 warps (16 registers per tile and thread).
#   4 warps spilled 4-228 B (sm_80 and sm_90, unaligned strides, fp32 3xTF32 and bf16; compile
#   gate); 2 stages pipeline the operand loads of the K loop. BLOCK_K: hidden-dimension step of
#   the tile GEMMs; fp32 inputs step BLOCK_K_F32 (3xTF32 keeps hi/lo splits of both operands).
# GEMM_*: the backward's plain GEMMs (G W, Gᵀ h): 128 x 64 tiles, 8 warps, 3 stages (128 x 128
#   spilled up to 900 B with fp32 3xTF32 on sm_80 and 100-230 B in the accumulating bf16 variant
#   with unaligned strides); BK 32 (16 for fp32, as above); GROUP_M: tile-row swizzle so
#   consecutive programs share operand tiles in L2.
# TARGET_PROGRAMS: the forward's row blocks x V splits aim at about two programs per SM of an
#   H100 (132 SMs), without querying the device; the interpreter takes 4 so the tests' small
#   shapes run several splits.
# CHUNK_ELEMENTS: rows per backward chunk x V <= 2^24 (32 MB per bf16 G buffer, 64 MB fp32),
#   at most MAX_CHUNK_ROWS rows, rounded to BLOCK_M; large enough that the Gᵀ h GEMM's reduction
#   (the chunk's rows) is not tiny for V = 128K (128 rows).
# maxnreg=255: as the logit kernels (ptxas's occupancy heuristic otherwise caps and spills).
FUSED_LINEAR_CONFIGS = {
    "gpu": {
        "BLOCK_M": 64, "BLOCK_V": 64, "BLOCK_K": 32, "BLOCK_K_F32": 16, "num_warps": 8, "num_stages": 2,
        "GEMM_M": 128, "GEMM_N": 64, "GEMM_K": 32, "GEMM_K_F32": 16, "GROUP_M": 8, "gemm_warps": 8, "gemm_stages": 3,
        "maxnreg": 255, "TARGET_PROGRAMS": 264, "CHUNK_ELEMENTS": 2**24, "MAX_CHUNK_ROWS": 4096,
    },
    "interpret": {
        "BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_K": 16, "BLOCK_K_F32": 16, "num_warps": 1, "num_stages": 1,
        "GEMM_M": 16, "GEMM_N": 16, "GEMM_K": 16, "GEMM_K_F32": 16, "GROUP_M": 2, "gemm_warps": 1, "gemm_stages": 1,
        "TARGET_PROGRAMS": 4, "CHUNK_ELEMENTS": 2**23, "MAX_CHUNK_ROWS": 4096,
    },
}  # fmt: skip

# MODE constexpr of the kernels (after the JSD endpoint rule of torch_impl.logit._jsd_mode)
KL_PQ, KL_QP, MIX = 0, 1, 2  # KL(p || q) (kd, forward KL), KL(q || p) (reverse KL), JSD mixture


def _config() -> dict:
    return FUSED_LINEAR_CONFIGS["interpret" if TRITON_INTERPRET else "gpu"]


def _opts(cfg: dict, warps: str = "num_warps", stages: str = "num_stages") -> dict:
    opts = {"num_warps": cfg[warps], "num_stages": cfg[stages]}
    if "maxnreg" in cfg:
        opts["maxnreg"] = cfg["maxnreg"]
    return opts


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _logits_tile(
    h_base,  # pointer: hidden row of the tile's first row (unit column stride)
    in_r,  # [BM] row mask
    w_ptr,  # [V, H] head (unit column stride)
    b_ptr,  # [V] bias (read when HAS_BIAS)
    v0,  # first vocabulary index of the tile
    in_c,  # [BN] column mask
    H,  # hidden width
    stride_h,  # hidden row stride
    stride_w,  # head row stride
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,  # fp32 dot precision: "tf32x3" | "tf32" | "ieee" (interpreter)
):
    # z[rows, v0 + j] = h[rows] @ W[v0 + j]ᵀ (+ b): fp32 [BM, BN], one tl.dot per BK step.
    # int64 bases, int32 offsets inside the tile (64-bit pointer tiles spilled with unaligned strides)
    kk = tl.arange(0, BK)
    jn = tl.arange(0, BN)
    h_off = tl.arange(0, BM)[:, None] * stride_h + kk[None, :]
    w_off = jn[None, :] * stride_w + kk[:, None]
    w_base = w_ptr + tl.cast(v0, tl.int64) * stride_w
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, H, BK):
        in_k = k0 + kk < H
        a = tl.load(h_base + k0 + h_off, mask=in_r[:, None] & in_k[None, :], other=0.0)
        b = tl.load(w_base + k0 + w_off, mask=in_k[:, None] & in_c[None, :], other=0.0)
        acc = policy_dot(a, b, acc, PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + v0 + jn, mask=in_c, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tempered_tiles(
    hs_base, ws_ptr, bs_ptr, Hs, stride_hs, stride_ws,  # student: first hidden row, head, bias, width, strides
    ht_base, wt_ptr, bt_ptr, Ht, stride_ht, stride_wt,  # teacher: the same
    in_r, v0, in_c, inv_t,  # row mask, first tile column, column mask, 1 / T
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BKS: tl.constexpr, BKT: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
):  # fmt: skip
    # (u_s, u_t) = z / T of one [BM, BN] tile; -inf past V (a class of probability 0)
    zs = _logits_tile(hs_base, in_r, ws_ptr, bs_ptr, v0, in_c, Hs, stride_hs, stride_ws, HAS_BS, BM, BN, BKS, PREC_S)
    zt = _logits_tile(ht_base, in_r, wt_ptr, bt_ptr, v0, in_c, Ht, stride_ht, stride_wt, HAS_BT, BM, BN, BKT, PREC_T)
    us = tl.where(in_c[None, :], zs * inv_t, float("-inf"))
    ut = tl.where(in_c[None, :], zt * inv_t, float("-inf"))
    return us, ut


@triton.jit
def _lse_step(m, s, u):
    # one tile of the online log-sum-exp of the rows of u [BM, BN] from the state (m, s) [BM]:
    #   m' = max(m, max_c u),  s' = s exp(m - m') + sum_c exp(u - m')      (0 terms for an empty state)
    # returns (m', s', e = exp(u - m'), f = exp(m - m')); NaN in u makes s' NaN, +inf gives
    # exp(inf - inf) = NaN
    tile_max = tl.max(u, axis=1)
    m_new = tl.where(tile_max > m, tile_max, m)
    f = _rescale(m, m_new)
    e = tl.exp(u - tl.where(m_new == float("-inf"), 0.0, m_new)[:, None])
    return m_new, s * f + tl.sum(e, axis=1), e, f


@triton.jit
def _fused_linear_fwd_kernel(
    hs_ptr,  # [N, Hs] student hidden states (unit column stride)
    ws_ptr,  # [V, Hs] student head
    bs_ptr,  # [V] student bias (read when HAS_BS)
    ht_ptr,  # [N, Ht] teacher hidden states
    wt_ptr,  # [V, Ht] teacher head
    bt_ptr,  # [V] teacher bias (read when HAS_BT)
    part_ptr,  # [5, N, P] fp32 out: per (row, split) m_s, S_s, m_t, S_t, A
    N,  # rows
    V,  # vocabulary
    Hs,  # student width
    Ht,  # teacher width
    P,  # V splits (grid axis 1)
    stride_hs,  # student hidden row stride
    stride_ws,  # student head row stride
    stride_ht,  # teacher hidden row stride
    stride_wt,  # teacher head row stride
    inv_t,  # 1 / T
    MODE: tl.constexpr,  # KL_PQ: A = sum e_t (u_t - u_s); KL_QP: A = sum e_s (u_s - u_t); MIX: no A
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
    BKS: tl.constexpr,  # student hidden step
    BKT: tl.constexpr,  # teacher hidden step
    PREC_S: tl.constexpr,  # student fp32 dot precision
    PREC_T: tl.constexpr,  # teacher fp32 dot precision
):
    # Pass 1 (module docstring): online log-sum-exp states of both rows over this split's V
    # tiles, with the cross term A of the one-pass KL (KL = A / S - lse + lse_other).
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_r = rows < N
    r64 = rows.to(tl.int64)
    hs_base = hs_ptr + tl.cast(tl.program_id(0) * BLOCK_M, tl.int64) * stride_hs
    ht_base = ht_ptr + tl.cast(tl.program_id(0) * BLOCK_M, tl.int64) * stride_ht
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    a = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(split * BLOCK_V, V, P * BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_c = cols < V
        us, ut = _tempered_tiles(hs_base, ws_ptr, bs_ptr, Hs, stride_hs, stride_ws, ht_base, wt_ptr, bt_ptr, Ht,
                                 stride_ht, stride_wt, in_r, v0, in_c, inv_t, HAS_BS, HAS_BT, BLOCK_M, BLOCK_V,
                                 BKS, BKT, PREC_S, PREC_T)  # fmt: skip
        if MODE == 0:  # KL(p || q): A rescaled with the teacher's state; p_c = 0 (u_t = -inf) adds nothing
            m_s, s_s, _, _ = _lse_step(m_s, s_s, us)
            m_t, s_t, e_t, f = _lse_step(m_t, s_t, ut)
            a = a * f + tl.sum(tl.where(ut == float("-inf"), 0.0, e_t * (ut - us)), axis=1)
        elif MODE == 1:  # KL(q || p): the roles swapped
            m_s, s_s, e_s, f = _lse_step(m_s, s_s, us)
            m_t, s_t, _, _ = _lse_step(m_t, s_t, ut)
            a = a * f + tl.sum(tl.where(us == float("-inf"), 0.0, e_s * (us - ut)), axis=1)
        else:
            m_s, s_s, _, _ = _lse_step(m_s, s_s, us)
            m_t, s_t, _, _ = _lse_step(m_t, s_t, ut)
    out = part_ptr + r64 * P + split
    np_ = tl.cast(N, tl.int64) * P
    tl.store(out, m_s, mask=in_r)
    tl.store(out + np_, s_s, mask=in_r)
    tl.store(out + 2 * np_, m_t, mask=in_r)
    tl.store(out + 3 * np_, s_t, mask=in_r)
    tl.store(out + 4 * np_, a, mask=in_r)


@triton.jit
def _plog(p, d):
    # p * d, 0 where p == 0 (a class of probability 0, where d may be NaN or inf: torch_impl _plog)
    return tl.where(p == 0.0, 0.0, p * d)


@triton.jit
def _fused_linear_sums_kernel(
    hs_ptr,  # [N, Hs] student hidden states
    ws_ptr,  # [V, Hs] student head
    bs_ptr,  # [V] student bias (read when HAS_BS)
    ht_ptr,  # [N, Ht] teacher hidden states
    wt_ptr,  # [V, Ht] teacher head
    bt_ptr,  # [V] teacher bias (read when HAS_BT)
    lse_s_ptr,  # [N] fp32 logsumexp(z_s / T)
    lse_t_ptr,  # [N] fp32 logsumexp(z_t / T)
    part_ptr,  # [2, N, P] fp32 out: per (row, split) partial K_t, K_s
    N,  # rows
    V,  # vocabulary
    Hs,  # student width
    Ht,  # teacher width
    P,  # V splits (grid axis 1)
    stride_hs,  # student hidden row stride
    stride_ws,  # student head row stride
    stride_ht,  # teacher hidden row stride
    stride_wt,  # teacher head row stride
    inv_t,  # 1 / T
    log_b,  # log beta (MIX)
    log_1mb,  # log(1 - beta) (MIX)
    MODE: tl.constexpr,  # MIX: K_t = KL(p || M), K_s = KL(q || M); else K_t = KL(p || q), K_s = KL(q || p)
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
    BKS: tl.constexpr,  # student hidden step
    BKT: tl.constexpr,  # teacher hidden step
    PREC_S: tl.constexpr,  # student fp32 dot precision
    PREC_T: tl.constexpr,  # teacher fp32 dot precision
):
    # Value pass with both lse known (module docstring):
    #   MIX:  K_t = sum_c p (l_t - log M),  K_s = sum_c q (l_s - log M),  log M = logaddexp(l_t + log b, l_s + log(1-b))
    #   else: K_t = sum_c p (l_t - l_s),    K_s = sum_c q (l_s - l_t)
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_r = rows < N
    r64 = rows.to(tl.int64)
    hs_base = hs_ptr + tl.cast(tl.program_id(0) * BLOCK_M, tl.int64) * stride_hs
    ht_base = ht_ptr + tl.cast(tl.program_id(0) * BLOCK_M, tl.int64) * stride_ht
    lse_s = tl.load(lse_s_ptr + rows, mask=in_r, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=in_r, other=0.0)
    k_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(split * BLOCK_V, V, P * BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_c = cols < V
        us, ut = _tempered_tiles(hs_base, ws_ptr, bs_ptr, Hs, stride_hs, stride_ws, ht_base, wt_ptr, bt_ptr, Ht,
                                 stride_ht, stride_wt, in_r, v0, in_c, inv_t, HAS_BS, HAS_BT, BLOCK_M, BLOCK_V,
                                 BKS, BKT, PREC_S, PREC_T)  # fmt: skip
        ls = us - lse_s[:, None]
        lt = ut - lse_t[:, None]
        q = tl.exp(ls)
        p = tl.exp(lt)
        if MODE == 2:
            lm = _log_mix(ls, lt, log_b, log_1mb)
            k_t += tl.sum(_plog(p, lt - lm), axis=1)
            k_s += tl.sum(_plog(q, ls - lm), axis=1)
        else:
            k_t += tl.sum(_plog(p, lt - ls), axis=1)
            k_s += tl.sum(_plog(q, ls - lt), axis=1)
    out = part_ptr + r64 * P + split
    tl.store(out, k_t, mask=in_r)
    tl.store(out + tl.cast(N, tl.int64) * P, k_s, mask=in_r)


@triton.jit
def _fused_linear_bwd_kernel(
    hs_ptr,  # [n, Hs] student hidden states of the chunk
    ws_ptr,  # [V, Hs] student head
    bs_ptr,  # [V] student bias (read when HAS_BS)
    ht_ptr,  # [n, Ht] teacher hidden states of the chunk
    wt_ptr,  # [V, Ht] teacher head
    bt_ptr,  # [V] teacher bias (read when HAS_BT)
    lse_s_ptr,  # [n] fp32 saved logsumexp(z_s / T)
    lse_t_ptr,  # [n] fp32 saved logsumexp(z_t / T)
    w_ptr,  # [n] fp32 dLoss/d(row_loss), 0 for dropped rows
    ks_ptr,  # [n] fp32 row scalar K_s (read when the student gradient needs it)
    kt_ptr,  # [n] fp32 row scalar K_t (read when the teacher gradient needs it)
    gs_ptr,  # [n, V] out: G_s in the student's dtype (written when NEED_S)
    gt_ptr,  # [n, V] out: G_t in the teacher's dtype (written when NEED_T)
    gbs_ptr,  # [V] fp32 in/out: += column sums of G_s (when BIAS_S)
    gbt_ptr,  # [V] fp32 in/out: += column sums of G_t (when BIAS_T)
    n,  # rows of the chunk
    V,  # vocabulary
    Hs,  # student width
    Ht,  # teacher width
    stride_hs,  # student hidden row stride
    stride_ws,  # student head row stride
    stride_ht,  # teacher hidden row stride
    stride_wt,  # teacher head row stride
    inv_t,  # 1 / T
    c_s,  # student scale: T (kd), 1/T (forward / reverse KL), (1 - beta)/T (JSD)
    c_t,  # teacher scale: T (kd), 1/T (forward / reverse KL), beta/T (JSD)
    log_b,  # log beta (MIX)
    log_1mb,  # log(1 - beta) (MIX)
    MODE: tl.constexpr,  # KL_PQ, KL_QP or MIX (module constants)
    NEED_S: tl.constexpr,
    NEED_T: tl.constexpr,
    BIAS_S: tl.constexpr,
    BIAS_T: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile per program
    BKS: tl.constexpr,  # student hidden step
    BKT: tl.constexpr,  # teacher hidden step
    PREC_S: tl.constexpr,  # student fp32 dot precision
    PREC_T: tl.constexpr,  # teacher fp32 dot precision
):
    # G tile (module docstring, "Backward"), times grad_row w:
    #   KL_PQ: G_s = c_s (q - p),                 G_t = c_t (p (l_t - l_s) - p K_t)
    #   KL_QP: G_s = c_s (q (l_s - l_t) - q K_s), G_t = c_t (p - q)
    #   MIX:   G_s = c_s (q (l_s - log M) - q K_s), G_t = c_t (p (l_t - log M) - p K_t)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_r = rows < n
    in_c = cols < V
    row0 = tl.cast(tl.program_id(0) * BLOCK_M, tl.int64)
    us, ut = _tempered_tiles(hs_ptr + row0 * stride_hs, ws_ptr, bs_ptr, Hs, stride_hs, stride_ws,
                             ht_ptr + row0 * stride_ht, wt_ptr, bt_ptr, Ht, stride_ht, stride_wt,
                             in_r, tl.program_id(1) * BLOCK_V, in_c, inv_t, HAS_BS, HAS_BT, BLOCK_M, BLOCK_V,
                             BKS, BKT, PREC_S, PREC_T)  # fmt: skip
    ls = us - tl.load(lse_s_ptr + rows, mask=in_r, other=0.0)[:, None]
    lt = ut - tl.load(lse_t_ptr + rows, mask=in_r, other=0.0)[:, None]
    q = tl.exp(ls)
    p = tl.exp(lt)
    w = tl.load(w_ptr + rows, mask=in_r, other=0.0)[:, None]
    dropped = w == 0.0  # dropped rows (and rows past n): 0 even where the row is NaN/inf
    tile = in_r[:, None] & in_c[None, :]
    g_base = row0 * V + tl.program_id(1) * BLOCK_V  # int64 tile base, int32 offsets inside the tile
    g_off = tl.arange(0, BLOCK_M)[:, None] * V + tl.arange(0, BLOCK_V)[None, :]
    if MODE == 2:
        lm = _log_mix(ls, lt, log_b, log_1mb)
    if NEED_S:
        if MODE == 0:
            g = q - p
        else:
            k_s = tl.load(ks_ptr + rows, mask=in_r, other=0.0)[:, None]
            if MODE == 1:
                g = _plog(q, ls - lt) - q * k_s
            else:
                g = _plog(q, ls - lm) - q * k_s
        g = tl.where(dropped, 0.0, g * (c_s * w))
        tl.store(gs_ptr + g_base + g_off, g.to(gs_ptr.dtype.element_ty), mask=tile)
        if BIAS_S:
            tl.atomic_add(gbs_ptr + cols, tl.sum(tl.where(tile, g, 0.0), axis=0), mask=in_c, sem="relaxed")
    if NEED_T:
        if MODE == 1:
            g = p - q
        else:
            k_t = tl.load(kt_ptr + rows, mask=in_r, other=0.0)[:, None]
            if MODE == 0:
                g = _plog(p, lt - ls) - p * k_t
            else:
                g = _plog(p, lt - lm) - p * k_t
        g = tl.where(dropped, 0.0, g * (c_t * w))
        tl.store(gt_ptr + g_base + g_off, g.to(gt_ptr.dtype.element_ty), mask=tile)
        if BIAS_T:
            tl.atomic_add(gbt_ptr + cols, tl.sum(tl.where(tile, g, 0.0), axis=0), mask=in_c, sem="relaxed")


@triton.jit
def _fused_linear_gemm_kernel(
    a_ptr,  # [M, K] left operand (strides stride_am, stride_ak), the dtype of b
    b_ptr,  # [K, N] right operand (strides stride_bk, stride_bn)
    c_ptr,  # [M, N] out (strides stride_cm, stride_cn): a @ b, or c + a @ b (ACCUMULATE)
    M,  # rows of a and c
    N,  # columns of b and c
    K,  # reduction length
    stride_am,  # a row stride
    stride_ak,  # a column stride
    stride_bk,  # b row stride
    stride_bn,  # b column stride
    stride_cm,  # c row stride
    stride_cn,  # c column stride
    ACCUMULATE: tl.constexpr,  # add the product to c (fp32 accumulation over chunks)
    BM: tl.constexpr,  # output tile rows
    BN: tl.constexpr,  # output tile columns
    BK: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # tile rows per swizzle group (L2 reuse)
    PREC: tl.constexpr,  # fp32 dot precision
):
    # C[BM, BN] (+)= sum_k A[BM, BK] B[BK, BN], fp32 accumulator, stored in c's dtype
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    # int64 tile bases, int32 offsets inside the tile (fewer live address registers: 64-bit
    # pointer tiles spilled with unaligned strides); the K step advances the bases
    im = tl.arange(0, BM)
    jn = tl.arange(0, BN)
    kk = tl.arange(0, BK)
    in_m = pid_m * BM + im < M
    in_n = pid_n * BN + jn < N
    a_base = a_ptr + tl.cast(pid_m * BM, tl.int64) * stride_am
    b_base = b_ptr + tl.cast(pid_n * BN, tl.int64) * stride_bn
    a_off = im[:, None] * stride_am + kk[None, :] * stride_ak
    b_off = kk[:, None] * stride_bk + jn[None, :] * stride_bn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        in_k = k0 + kk < K
        a = tl.load(a_base + a_off, mask=in_m[:, None] & in_k[None, :], other=0.0)
        b = tl.load(b_base + b_off, mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc = policy_dot(a, b, acc, PREC)
        a_base += tl.cast(BK, tl.int64) * stride_ak
        b_base += tl.cast(BK, tl.int64) * stride_bk
    c_ptrs = (c_ptr + tl.cast(pid_m * BM, tl.int64) * stride_cm + tl.cast(pid_n * BN, tl.int64) * stride_cn
              + (im[:, None] * stride_cm + jn[None, :] * stride_cn))  # fmt: skip
    tile = in_m[:, None] & in_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=tile, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=tile)


# --------------------------------------------------------------------------------- launchers


def _mode(kind: str, beta: float) -> int:
    """MODE of the kernels: the JSD endpoint rule of torch_impl.logit._jsd_mode (beta = 0: the
    forward KL without T^2, beta = 1: the reverse KL)."""
    if kind == "kd" or beta == 0.0:
        return KL_PQ
    return KL_QP if beta == 1.0 else MIX


def _logs(beta: float) -> tuple[float, float]:
    """(log beta, log(1 - beta)) for the mixture (unused, 0, outside 0 < beta < 1)."""
    return (math.log(beta), math.log1p(-beta)) if 0.0 < beta < 1.0 else (0.0, 0.0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _bk(cfg: dict, x: torch.Tensor) -> int:
    return cfg["BLOCK_K_F32"] if x.dtype == torch.float32 else cfg["BLOCK_K"]


class _Heads:
    """Both sides' tensors, made row-major, and the kernel arguments they share."""

    def __init__(self, hs, ws, bs, ht, wt, bt, temperature):
        self.hs, self.ws, self.ht, self.wt = _rows(hs), _rows(ws), _rows(ht), _rows(wt)
        self.has_bs, self.has_bt = bs.numel() > 0, bt.numel() > 0
        self.bs = bs.contiguous() if self.has_bs else self.ws  # a dummy pointer when absent
        self.bt = bt.contiguous() if self.has_bt else self.wt
        self.n, self.v = hs.shape[0], ws.shape[0]
        self.inv_t = 1.0 / float(temperature)
        self.cfg = _config()
        prec = dot_precision()
        self.consts = {
            "HAS_BS": self.has_bs, "HAS_BT": self.has_bt, "BLOCK_M": self.cfg["BLOCK_M"],
            "BLOCK_V": self.cfg["BLOCK_V"], "BKS": _bk(self.cfg, self.hs), "BKT": _bk(self.cfg, self.ht),
            "PREC_S": prec, "PREC_T": prec,
        }  # fmt: skip

    def tensors(self, a: int = 0, b: int | None = None):
        b = self.n if b is None else b
        return (self.hs[a:b], self.ws, self.bs, self.ht[a:b], self.wt, self.bt)

    def sizes(self):
        return (self.v, self.hs.shape[1], self.ht.shape[1])

    def strides(self):
        return (self.hs.stride(0), self.ws.stride(0), self.ht.stride(0), self.wt.stride(0))

    def splits(self, splits: int | None) -> int:
        tiles = triton.cdiv(self.v, self.cfg["BLOCK_V"])
        if splits is None:
            splits = triton.cdiv(self.cfg["TARGET_PROGRAMS"], triton.cdiv(self.n, self.cfg["BLOCK_M"]))
        return max(1, min(int(splits), tiles))


def _merge(m: torch.Tensor, s: torch.Tensor):
    """Merge per-split log-sum-exp states ``[N, P]``: ``(f [N, P], lse [N])`` with
    M = max_k m_k, f_k = exp(m_k - M) (0 for an empty split), lse = M + log sum_k s_k f_k
    (the split's cross terms A_k merge with the same f)."""
    big = m.amax(1)
    f = torch.where(m == float("-inf"), 0.0, torch.exp(m - big[:, None]))
    return f, big + torch.log((s * f).sum(1))


def _row_sums(heads: _Heads, mode: int, lse_s, lse_t, beta: float, splits: int):
    """``(K_t [N], K_s [N])`` of ``_fused_linear_sums_kernel`` (its MODE comment)."""
    n, cfg = heads.n, heads.cfg
    part = torch.empty(2, n, splits, device=heads.hs.device, dtype=torch.float32)
    _fused_linear_sums_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), splits)](
        *heads.tensors(), lse_s, lse_t, part, n, *heads.sizes(), splits, *heads.strides(), heads.inv_t,
        *_logs(beta), MODE=mode, **heads.consts, **_opts(cfg),
    )  # fmt: skip
    k = part.sum(2)
    return k[0], k[1]


def _forward(kind, hs, ws, bs, ht, wt, bt, temperature, beta, ignore_mask, splits=None):
    mode = _mode(kind, float(beta))
    heads = _Heads(hs, ws, bs, ht, wt, bt, temperature)
    n, cfg = heads.n, heads.cfg
    p = heads.splits(splits)
    part = torch.empty(5, n, p, device=heads.hs.device, dtype=torch.float32)
    _fused_linear_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), p)](
        *heads.tensors(), part, n, *heads.sizes(), p, *heads.strides(), heads.inv_t, MODE=mode,
        **heads.consts, **_opts(cfg),
    )  # fmt: skip
    m_s, s_s, m_t, s_t, a = part.unbind(0)
    f_s, lse_s = _merge(m_s, s_s)
    f_t, lse_t = _merge(m_t, s_t)
    if mode == KL_PQ:  # T^2 KL(p || q) = T^2 (A / S_t - lse_t + lse_s) (forward KL: no T^2)
        row = (a * f_t).sum(1) / (s_t * f_t).sum(1) - lse_t + lse_s
        row = row * (float(temperature) ** 2 if kind == "kd" else 1.0)
    elif mode == KL_QP:
        row = (a * f_s).sum(1) / (s_s * f_s).sum(1) - lse_s + lse_t
    else:
        k_t, k_s = _row_sums(heads, MIX, lse_s, lse_t, float(beta), p)
        row = float(beta) * k_t + (1.0 - float(beta)) * k_s
    if ignore_mask is not None:
        row = torch.where(ignore_mask.to(torch.bool), 0.0, row)
    return row, lse_s, lse_t


def _chunk_rows(cfg: dict, v: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    rows = min(cfg["MAX_CHUNK_ROWS"], cfg["CHUNK_ELEMENTS"] // max(v, 1))
    return rows // cfg["BLOCK_M"] * cfg["BLOCK_M"] if rows >= cfg["BLOCK_M"] else max(1, rows)


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool, cfg: dict) -> None:
    """``c (+)= a @ b`` by ``_fused_linear_gemm_kernel`` (any strides; a and b of one dtype)."""
    m, k = a.shape
    n = b.shape[1]
    grid = (triton.cdiv(m, cfg["GEMM_M"]) * triton.cdiv(n, cfg["GEMM_N"]),)
    _fused_linear_gemm_kernel[grid](
        a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        ACCUMULATE=accumulate, BM=cfg["GEMM_M"], BN=cfg["GEMM_N"],
        BK=cfg["GEMM_K_F32"] if a.dtype == torch.float32 else cfg["GEMM_K"], GROUP_M=cfg["GROUP_M"],
        PREC=dot_precision(), **_opts(cfg, "gemm_warps", "gemm_stages"),
    )  # fmt: skip


def _backward(kind, grad_row, hs, ws, bs, ht, wt, bt, lse_s, lse_t, temperature, beta, ignore_mask, needs,
              chunk_rows=None, splits=None):  # fmt: skip
    inputs = (hs, ws, bs, ht, wt, bt)
    needs = tuple(bool(x) and t.numel() > 0 for x, t in zip(needs, inputs, strict=True))
    need_s, need_t = any(needs[:3]), any(needs[3:])
    beta, temperature = float(beta), float(temperature)
    mode = _mode(kind, beta)
    heads = _Heads(hs, ws, bs, ht, wt, bt, temperature)
    n, v, cfg, dev = heads.n, heads.v, heads.cfg, hs.device
    outs = [t.new_empty(0) for t in inputs]
    if not (need_s or need_t) or n == 0:
        return tuple(outs)
    lse_s = lse_s.float().contiguous()
    lse_t = lse_t.float().contiguous()
    w = grad_row.to(torch.float32)
    if ignore_mask is not None:
        w = torch.where(ignore_mask.to(torch.bool), 0.0, w)
    w = w.contiguous()
    # row scalars: K_s (reverse KL, JSD student), K_t (kd / forward KL teacher, JSD teacher)
    k_s = k_t = w  # dummies, never read
    if (need_s and mode != KL_PQ) or (need_t and mode != KL_QP):
        k_t, k_s = _row_sums(heads, mode, lse_s, lse_t, beta, heads.splits(splits))
    if mode == KL_PQ:
        c_s = c_t = temperature if kind == "kd" else 1.0 / temperature
    elif mode == KL_QP:
        c_s = c_t = 1.0 / temperature
    else:
        c_s, c_t = (1.0 - beta) / temperature, beta / temperature
    # fp32 accumulators: the biases' zeroed (atomics), the weights' written by the first chunk's GEMM
    acc = [None] * 6
    for i in (2, 5):
        if needs[i]:
            acc[i] = torch.zeros(inputs[i].shape, device=dev, dtype=torch.float32)
    for i in (0, 3):
        if needs[i]:
            outs[i] = torch.empty(inputs[i].shape, device=dev, dtype=inputs[i].dtype)
    step = _chunk_rows(cfg, v, chunk_rows)
    g_s = torch.empty(min(step, n), v, device=dev, dtype=hs.dtype) if need_s else w
    g_t = torch.empty(min(step, n), v, device=dev, dtype=ht.dtype) if need_t else w
    gb_s = acc[2] if needs[2] else w
    gb_t = acc[5] if needs[5] else w
    for a in range(0, n, step):
        b = min(a + step, n)
        rows = b - a
        _fused_linear_bwd_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(v, cfg["BLOCK_V"]))](
            *heads.tensors(a, b), lse_s[a:b], lse_t[a:b], w[a:b], k_s[a:b], k_t[a:b], g_s, g_t, gb_s, gb_t,
            rows, *heads.sizes(), *heads.strides(), heads.inv_t, c_s, c_t, *_logs(beta), MODE=mode,
            NEED_S=need_s, NEED_T=need_t, BIAS_S=needs[2], BIAS_T=needs[5], **heads.consts, **_opts(cfg),
        )  # fmt: skip
        for side, g, h, wgt in ((0, g_s, heads.hs, heads.ws), (3, g_t, heads.ht, heads.wt)):
            g = g[:rows]
            if needs[side]:  # grad_h[a:b] = G W
                _gemm(g, wgt, outs[side][a:b], False, cfg)
            if needs[side + 1]:  # grad_W (+)= Gᵀ h[a:b], fp32 over the chunks
                if acc[side + 1] is None:
                    acc[side + 1] = torch.empty(wgt.shape, device=dev, dtype=torch.float32)
                    _gemm(g.t(), h[a:b], acc[side + 1], False, cfg)
                else:
                    _gemm(g.t(), h[a:b], acc[side + 1], True, cfg)
    for i in (1, 2, 4, 5):
        if needs[i]:
            outs[i] = acc[i].to(inputs[i].dtype)
    return tuple(outs)


def fused_linear_kd_fwd_triton(hs, ws, bs, ht, wt, bt, temperature, ignore_mask, *, splits=None):
    """``(row_loss [N], lse_s [N], lse_t [N])`` float32 of the fused-linear KD, as the torch kernel
    (``torch_impl.fused_linear.fused_linear_fwd("kd", ...)``); ``splits`` forces the V splits."""
    return _forward("kd", hs, ws, bs, ht, wt, bt, temperature, 0.0, ignore_mask, splits)


def fused_linear_jsd_fwd_triton(hs, ws, bs, ht, wt, bt, beta, temperature, ignore_mask, *, splits=None):
    """``(row_loss [N], lse_s [N], lse_t [N])`` float32 of the fused-linear JSD(beta) (beta = 0:
    KL(p || q), beta = 1: KL(q || p)), as the torch kernel."""
    return _forward("jsd", hs, ws, bs, ht, wt, bt, temperature, beta, ignore_mask, splits)


def fused_linear_kd_bwd_triton(grad_row, hs, ws, bs, ht, wt, bt, lse_s, lse_t, temperature, ignore_mask,
                               *needs, chunk_rows=None, splits=None):  # fmt: skip
    """The six gradients (student hidden, weight, bias, teacher hidden, weight, bias) of the
    fused-linear KD given ``grad_row [N]``; empty where ``needs`` says no or the bias is empty.
    ``chunk_rows`` / ``splits`` force the backward chunk and the row-scalar pass's V splits."""
    return _backward("kd", grad_row, hs, ws, bs, ht, wt, bt, lse_s, lse_t, temperature, 0.0, ignore_mask,
                     needs, chunk_rows, splits)  # fmt: skip


def fused_linear_jsd_bwd_triton(grad_row, hs, ws, bs, ht, wt, bt, lse_s, lse_t, beta, temperature, ignore_mask,
                                *needs, chunk_rows=None, splits=None):  # fmt: skip
    """The six gradients of the fused-linear JSD(beta), as :func:`fused_linear_kd_bwd_triton`."""
    return _backward("jsd", grad_row, hs, ws, bs, ht, wt, bt, lse_s, lse_t, temperature, beta, ignore_mask,
                     needs, chunk_rows, splits)  # fmt: skip
