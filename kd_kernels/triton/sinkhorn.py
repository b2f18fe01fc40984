"""Triton kernels of batched log-domain Sinkhorn (docs/sinkhorn.md §4-6; notation and both
recurrences in the comment block "Batched log-domain Sinkhorn" of kd_kernels/torch_impl/sinkhorn.py).

Launchers ``sinkhorn_fwd_triton`` / ``sinkhorn_bwd_triton`` implement the op contract of
kd_kernels/ops/sinkhorn.py (``tol``, ``check_every``, ``implicit``): potentials are float32
(fp32 / fp16 / bf16 costs), the plan is in the cost's dtype, ``n_run`` [B] int32 says on the
device how many iterations each problem ran. No host synchronisation: the number of launches is
fixed by ``n_iters``; a frozen problem's programs read ``n_run`` and do nothing.

Log2 domain. With L2E = log2(e) every kernel works in ``M2 = -C * L2E / eps`` and potentials
times L2E (``exp2`` / ``log2``, the log(e) factor folded into one scale per element); potentials
are stored in natural units (alpha = f / eps, beta = g / eps, as the torch path).

Forward, per iteration k (all B problems per launch):

- ``_sinkhorn_row_kernel`` (grid: problem groups x row blocks): for its rows, sweep the columns in
  tiles with an online log-sum-exp (running max, rescaled sum): alpha_k = log a - LSE_j(M + beta_{k-1}).
  With alpha_k of its rows known, the program then writes the column partials (max_i, sum_i exp2)
  of M2 + alpha2 over its rows into [B, R, m] buffers (R = row programs). When the whole row fits
  one tile (m <= SINGLE_MAX) both come from the same registers: ONE read of the cost per iteration;
  such a program walks RS blocks of rows and merges their column partials in registers, so R is
  n / (RS * BN). Wider rows take a second sweep over the same tiles (L2-resident for moderate rows).
  A shared cost (stride 0 over B) is read once per program for PB problems (3-D tiles
  [PB, rows, cols]); the problem group is grid axis 0, so the programs that read the same cost rows
  run side by side and the cost comes from HBM once per iteration.
- ``_sinkhorn_col_kernel`` (grid: column blocks x B): merges the R partials of each column into
  beta_k = log b - LSE_i(M + alpha_k) (small: 2 R m floats per problem).
- tol > 0, after iteration k when k % check_every == 0 and k < n_iters:
  ``_sinkhorn_check_kernel`` writes per row block sum_i |sum_j P_ij - a_i| into [B, R] and
  ``_sinkhorn_freeze_kernel`` sums them and sets n_run[b] = k where err_b <= tol (n_run[b] ==
  n_iters means "not frozen": no separate flag).
- ``_sinkhorn_plan_kernel``: P = exp2(M2 + alpha2 + beta2) in the cost's dtype.
- Unrolled mode: alphas[k] / betas[k] are written in place; rows k >= n_run[b] of a frozen problem
  are filled after the loop with one device gather (no host sync). Implicit mode: the single slot
  [0] is updated in place (the row kernel reads betas[0] and writes alphas[0], the column kernel
  the reverse: no launch reads what it writes).

Backward, the reverse recurrence (step k = n_iters-1 .. 0; problem b takes the steps k < n_run[b]):

- ``_sinkhorn_bwd_init_kernel``: W = dP o P (final potentials) -> dM = W (fp32 [B, n, m] buffer),
  abar_out = W 1 (rows), column partials of W^T 1.
- ``_sinkhorn_bwd_step_kernel`` (grid: B x row blocks): sweep 1, the beta step's softmax over i:
  Qb = exp(M + alpha_k 1^T + 1 (beta_k - log b)^T), abar = abar_in - Qb bbar, where abar_in =
  abar_out at the problem's first step (k == n_run[b] - 1) and 0 after it (the torch loop's
  carried abar); dlog a += abar. Sweep 2, the alpha step's softmax over j: Qa = exp(M + (alpha_k -
  log a) 1^T + 1 beta_{k-1}^T), column partials of -Qa^T abar, and dM -= Qb diag(bbar) + diag(abar) Qa
  (Qb recomputed: an exp is cheaper than a second read-modify-write of dM). The step k = 0 writes
  grad_cost = -dM / eps in the cost's dtype directly (no extra pass). Single-tile rows: one sweep.
- ``_sinkhorn_bwd_col_kernel``: dlog b += bbar; bbar = sum of the partials.
- implicit: every step uses the final potentials (alpha_k = alpha*, beta_k = beta_{k-1} = beta*), so
  Qa and Qb are the same in every step and the dM updates of all steps sum to Qb diag(dlog b) +
  diag(dlog a) Qa: the steps run without dM (abar / bbar only), and ``_sinkhorn_bwd_implicit_kernel``
  writes grad_cost = -(W - Qb diag(dlog b) - diag(dlog a) Qa) / eps in one pass at the end (no
  [B, n, m] fp32 buffer: O(B (n + m)) memory besides the output).
- grad_a = dlog a / a, grad_b = dlog b / b (torch ops on [B, n] / [B, m], as the torch path).

Zero marginal entries: log a_i = -inf gives alpha_i = -inf in the forward (the row contributes
exp2(-inf) = 0 to every column); the backward's shifts alpha - log a use -inf where a_i = 0 (the
torch path's ``_minus_log``), so those softmax terms are exactly 0. Every online LSE uses a
"safe" running max (0 where it is still -inf), so empty tiles never form -inf - (-inf).

No GEMM: the LSE sweeps are elementwise exp2 plus row / column reductions (the backward's
Qa^T abar is a matrix-vector product), so no ``tl.dot`` and no tensor cores are involved.

Memory: forward saves O(n_iters B (n + m)) potentials (O(B (n + m)) implicit) plus the [B, R, m]
partials; the unrolled backward holds dM [B, n, m] fp32 (the gradient output itself for fp32
costs), the implicit one none, plus O(B (R m + n + m)) vectors — never an n_iters x B x n x m stack.

Left: the GPU tile sizes below are first choices checked by the compile gate (0 spills), not yet
run or tuned on a GPU; a very wide row (m >> SINGLE_MAX with many row blocks in flight) re-reads the
cost from HBM in the second sweep when its rows no longer fit L2; the backward step writes one
partial row per BN rows (no RS merge yet), 4 B per column and block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kd_kernels._backend import TRITON_INTERPRET

__all__ = ["SINKHORN_CONFIGS", "sinkhorn_bwd_triton", "sinkhorn_fwd_triton"]

_L2E = tl.constexpr(1.4426950408889634)  # log2(e)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2)

# TILE: elements of one [PB, rows, cols] forward tile (rows = TILE // (PB * cols)). The compiled
# layouts spread a warp along the columns, so every thread also holds its rows' running LSE
# state: registers grow with rows per thread (compile gate, sm_80, bf16, 16 x 128 tile: 168
# registers and 20-28 B spilled with 4 warps; 116 registers, no spill with 8). Hence 2048
# elements on 8 warps (8 values per thread and tile). BWD_TILE: the backward step holds more
# tiles at once (M2, Qb, Qa, dM): 2048 spilled 4-8 B on sm_90a (fp16/bf16, odd shapes) at 128
# registers, 1024 needs <= 80. BLOCK_M: column tile of rows wider than SINGLE_MAX (128 columns:
# 256-512 B per row, whole cache lines). SINGLE_MAX: the widest row kept in one tile (one cost
# read per iteration); 256 columns still leave 8 rows per program, so the partials (8 B per
# column and row block) stay <= 1 B per cost element. GROUP: problems per program for a shared
# (stride-0) cost: 4 problems share each cost tile load. BLOCK_C / BLOCK_R: columns and partial
# rows per step of the column reductions; BLOCK_B: problems per program of the freeze kernel.
# maxnreg = 128: ptxas's occupancy heuristic otherwise capped the single-tile row kernel at 64
# registers and spilled 4 B (sm_90a, bf16, odd shapes); 128 on 8 warps still leaves 2 programs
# per SM. MAX_ROWS: cap on rows per block. SINGLE_ROWS: rows per program of the single-tile row kernel
# (RS blocks of BN rows): its column partials are merged in registers, so the partials cost
# 8 B per column and 64 rows (1/32 B per cost element). num_stages = 1: the sweeps are streaming loops whose loads
# are consumed at once (no software pipelining buffers to pay for).
SINKHORN_CONFIGS = {
    "gpu": {
        "TILE": 2048, "BWD_TILE": 1024, "BLOCK_M": 128, "SINGLE_MAX": 256, "GROUP": 4, "MAX_ROWS": 64, "SINGLE_ROWS": 64,
        "BLOCK_C": 128, "BLOCK_R": 16, "BLOCK_B": 128, "num_warps": 8, "num_stages": 1, "maxnreg": 128,
    },
    # tiny tiles so the small test shapes span several row blocks, column tiles and problem groups
    "interpret": {
        "TILE": 64, "BWD_TILE": 64, "BLOCK_M": 8, "SINGLE_MAX": 16, "GROUP": 2, "MAX_ROWS": 8, "SINGLE_ROWS": 8,
        "BLOCK_C": 8, "BLOCK_R": 2, "BLOCK_B": 4, "num_warps": 1, "num_stages": 1,
    },
}  # fmt: skip


def _config() -> dict:
    return SINKHORN_CONFIGS["interpret" if TRITON_INTERPRET else "gpu"]


def _launch_opts(cfg: dict) -> dict:
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if "maxnreg" in cfg:
        opts["maxnreg"] = cfg["maxnreg"]
    return opts


def _geometry(n: int, m: int, pb: int, tile: int, cfg: dict) -> tuple[int, int, bool, int]:
    """(rows per block BN, column tile BM, SINGLE, row blocks per program RS) for an [n, m] cost
    and PB problems per program. RS > 1 only for single-tile rows (``_sinkhorn_row_kernel``)."""
    single = m <= cfg["SINGLE_MAX"]
    bm = triton.next_power_of_2(m) if single else cfg["BLOCK_M"]
    bn = max(1, min(cfg["MAX_ROWS"], tile // (pb * bm), triton.next_power_of_2(n)))
    rs = max(1, min(cfg["SINGLE_ROWS"] // bn, triton.cdiv(n, bn))) if single else 1
    return bn, bm, single, rs


# ----------------------------------------------------------------------------------- tile helpers


@triton.jit
def _m2_tile(cost_ptr, p64, in_p, offs_i, offs_j, N, M, scale, s_cb, s_cn, s_cm, SHARED: tl.constexpr):
    # M2 = C * scale (scale = -log2(e) / eps) for problems p64 [PB], rows offs_i [BN], columns
    # offs_j [BM]: [PB, BN, BM] (or [1, BN, BM] broadcast over PB for a shared cost), -inf outside.
    in_i = offs_i < N
    in_j = offs_j < M
    rc = offs_i.to(tl.int64)[:, None] * s_cn + offs_j.to(tl.int64)[None, :] * s_cm
    m_ij = in_i[:, None] & in_j[None, :]
    if SHARED:
        c = tl.load(cost_ptr + rc, mask=m_ij, other=0.0).to(tl.float32)
        return tl.where(m_ij, c * scale, float("-inf"))[None, :, :]
    else:
        msk = in_p[:, None, None] & m_ij[None, :, :]
        c = tl.load(cost_ptr + p64[:, None, None] * s_cb + rc[None, :, :], mask=msk, other=0.0).to(tl.float32)
        return tl.where(msk, c * scale, float("-inf"))


@triton.jit
def _lse_step(mx, sm, x, AXIS: tl.constexpr):
    # One online log2-sum-exp2 step along AXIS: (mx, sm) -> running max and sum of exp2(x - max).
    # The "safe" max (0 while everything is -inf) keeps -inf - (-inf) = NaN out.
    new = tl.maximum(mx, tl.max(x, axis=AXIS))
    safe = tl.where(new == float("-inf"), 0.0, new)
    sm = sm * tl.exp2(mx - safe) + tl.sum(tl.exp2(x - tl.expand_dims(safe, AXIS)), axis=AXIS)
    return new, sm


@triton.jit
def _col_partial(y):
    # Column partial (max_i, sum_i exp2(y - max)) of y [PB, BN, BM] over its rows: two [PB, BM].
    cmx = tl.max(y, axis=1)
    safe = tl.where(cmx == float("-inf"), 0.0, cmx)
    return cmx, tl.sum(tl.exp2(y - safe[:, None, :]), axis=1)


@triton.jit
def _load_vec(ptr, p64, live, offs, L, s_b, s_l, other):
    # [PB, BL] fp32 tile of a [B, L] vector read through its strides (stride 0 allowed); `other` outside.
    msk = live[:, None] & (offs < L)[None, :]
    v = tl.load(ptr + p64[:, None] * s_b + offs.to(tl.int64)[None, :] * s_l, mask=msk, other=other)
    return v.to(tl.float32)


# ----------------------------------------------------------------------------------- forward kernels
# alpha_k = log a - LSE_j(M + beta_{k-1})  (beta_0 = 0);  beta_k = log b - LSE_i(M + alpha_k)
# in log2 units: alpha2 = log2 a - log2sumexp2_j(M2 + beta2), stored as alpha2 * ln 2.


@triton.jit(do_not_specialize=["beta_off", "alpha_off"])
def _sinkhorn_row_kernel(
    cost_ptr,  # [B, n, m] cost (fp32 / fp16 / bf16), strides (s_cb, s_cn, s_cm); s_cb = 0: shared
    a_ptr,  # [B, n] row marginal, strides (s_ab, s_an)
    beta_ptr,  # [S, B, m] fp32 betas; beta_{k-1} at element offset beta_off (read when HAS_BETA)
    alpha_ptr,  # [S, B, n] fp32 alphas; alpha_k written at element offset alpha_off
    pmax_ptr,  # [B, R, m] fp32 out: column partial max of M2 + alpha2 over this row block
    psum_ptr,  # [B, R, m] fp32 out: column partial sum of exp2(M2 + alpha2 - pmax)
    nrun_ptr,  # [B] int32: n_run; a problem with n_run != n_iters is frozen (skipped)
    beta_off,  # element offset of beta_{k-1} in beta_ptr (slot * B * m)
    alpha_off,  # element offset of alpha_k in alpha_ptr (slot * B * n)
    B,  # problems
    N,  # rows n
    M,  # columns m
    R,  # row blocks (partials' second dimension)
    n_iters,  # iterations (the "not frozen" value of n_run)
    scale,  # -log2(e) / eps
    s_cb,  # cost batch stride (0: one shared cost)
    s_cn,  # cost row stride
    s_cm,  # cost column stride
    s_ab,  # a batch stride
    s_an,  # a row stride
    HAS_BETA: tl.constexpr,  # False at k = 1 (beta_0 = 0)
    SHARED: tl.constexpr,  # cost is shared over B: one 2-D tile load for the PB problems
    SINGLE: tl.constexpr,  # the whole row is one tile (BM >= m): one cost read per iteration
    RS: tl.constexpr,  # SINGLE: row blocks per program (one partial row per RS * BN rows)
    PB: tl.constexpr,  # problems per program
    BN: tl.constexpr,  # rows per row block
    BM: tl.constexpr,  # column tile
):
    offs_p = tl.program_id(0) * PB + tl.arange(0, PB)
    rb = tl.program_id(1)
    in_p = offs_p < B
    live = in_p & (tl.load(nrun_ptr + offs_p, mask=in_p, other=0) == n_iters)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        p64 = offs_p.to(tl.int64)
        part = (p64 * R + rb)[:, None] * M  # [PB, 1] int64 row of the partials
        if SINGLE:
            # RS row blocks of BN rows, each a whole-row tile: alpha from the tile, then its column
            # partial merged into running (max, sum) registers; one partial row per program.
            offs_j = tl.arange(0, BM)
            in_j = offs_j < M
            if HAS_BETA:
                bt = _load_vec(beta_ptr + beta_off, p64, live, offs_j, M, M, 1, 0.0) * _L2E
            else:
                bt = tl.zeros([PB, BM], tl.float32)
            cmx = tl.full([PB, BM], float("-inf"), tl.float32)
            csum = tl.zeros([PB, BM], tl.float32)
            for rs in range(RS):
                offs_i = (rb * RS + rs) * BN + tl.arange(0, BN)
                in_i = offs_i < N
                log2a = tl.log2(_load_vec(a_ptr, p64, live, offs_i, N, s_ab, s_an, 1.0))  # [PB, BN]
                m2 = _m2_tile(cost_ptr, p64, live, offs_i, offs_j, N, M, scale, s_cb, s_cn, s_cm, SHARED)
                mx, sm = _lse_step(
                    tl.full([PB, BN], float("-inf"), tl.float32), tl.zeros([PB, BN], tl.float32),
                    m2 + bt[:, None, :], 2,
                )  # fmt: skip
                alpha2 = tl.where(in_i[None, :], log2a - (mx + tl.log2(tl.where(sm > 0, sm, 1.0))), float("-inf"))
                row_ok = live[:, None] & in_i[None, :]
                tl.store(alpha_ptr + alpha_off + p64[:, None] * N + offs_i[None, :], alpha2 * _LN2, mask=row_ok)
                pm, ps = _col_partial(m2 + alpha2[:, :, None])
                new = tl.maximum(cmx, pm)
                safe = tl.where(new == float("-inf"), 0.0, new)
                csum = csum * tl.exp2(cmx - safe) + ps * tl.exp2(pm - safe)
                cmx = new
            msk = live[:, None] & in_j[None, :]
            tl.store(pmax_ptr + part + offs_j[None, :], cmx, mask=msk)
            tl.store(psum_ptr + part + offs_j[None, :], csum, mask=msk)
        else:
            offs_i = rb * BN + tl.arange(0, BN)
            in_i = offs_i < N
            log2a = tl.log2(_load_vec(a_ptr, p64, live, offs_i, N, s_ab, s_an, 1.0))  # [PB, BN]
            mx = tl.full([PB, BN], float("-inf"), tl.float32)
            sm = tl.zeros([PB, BN], tl.float32)
            for j0 in range(0, M, BM):
                offs_j = j0 + tl.arange(0, BM)
                m2 = _m2_tile(cost_ptr, p64, live, offs_i, offs_j, N, M, scale, s_cb, s_cn, s_cm, SHARED)
                if HAS_BETA:
                    bt = _load_vec(beta_ptr + beta_off, p64, live, offs_j, M, M, 1, 0.0) * _L2E
                    x = m2 + bt[:, None, :]
                else:
                    x = m2 + tl.zeros([PB, 1, 1], tl.float32)
                mx, sm = _lse_step(mx, sm, x, 2)
            alpha2 = tl.where(in_i[None, :], log2a - (mx + tl.log2(tl.where(sm > 0, sm, 1.0))), float("-inf"))
            row_ok = live[:, None] & in_i[None, :]
            tl.store(alpha_ptr + alpha_off + p64[:, None] * N + offs_i[None, :], alpha2 * _LN2, mask=row_ok)
            # second sweep over the same tiles (L2-resident): column partials with alpha_k known
            for j0 in range(0, M, BM):
                offs_j = j0 + tl.arange(0, BM)
                m2 = _m2_tile(cost_ptr, p64, live, offs_i, offs_j, N, M, scale, s_cb, s_cn, s_cm, SHARED)
                cmx, csum = _col_partial(m2 + alpha2[:, :, None])
                msk = live[:, None] & (offs_j < M)[None, :]
                tl.store(pmax_ptr + part + offs_j[None, :], cmx, mask=msk)
                tl.store(psum_ptr + part + offs_j[None, :], csum, mask=msk)


@triton.jit(do_not_specialize=["beta_off"])
def _sinkhorn_col_kernel(
    pmax_ptr,  # [B, R, m] fp32 column partial maxima (row kernel)
    psum_ptr,  # [B, R, m] fp32 column partial sums
    b_ptr,  # [B, m] column marginal, strides (s_bb, s_bm)
    beta_ptr,  # [S, B, m] fp32 betas; beta_k written at element offset beta_off
    nrun_ptr,  # [B] int32 n_run (frozen: != n_iters)
    beta_off,  # element offset of beta_k (slot * B * m)
    M,  # columns m
    R,  # row blocks
    n_iters,  # iterations
    s_bb,  # b batch stride
    s_bm,  # b column stride
    BC: tl.constexpr,  # columns per program
    BR: tl.constexpr,  # partial rows merged per step
):
    # beta2_j = log2 b_j - (max_r pmax_rj + log2 sum_r psum_rj exp2(pmax_rj - max))
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if tl.load(nrun_ptr + b) == n_iters:
        offs_j = pid_c * BC + tl.arange(0, BC)
        in_j = offs_j < M
        mx = tl.full([BC], float("-inf"), tl.float32)
        sm = tl.zeros([BC], tl.float32)
        for r0 in range(0, R, BR):
            offs_r = r0 + tl.arange(0, BR)
            msk = (offs_r < R)[:, None] & in_j[None, :]
            idx = (b * R + offs_r.to(tl.int64))[:, None] * M + offs_j[None, :]
            pm = tl.load(pmax_ptr + idx, mask=msk, other=float("-inf"))
            ps = tl.load(psum_ptr + idx, mask=msk, other=0.0)
            new = tl.maximum(mx, tl.max(pm, axis=0))
            safe = tl.where(new == float("-inf"), 0.0, new)
            sm = sm * tl.exp2(mx - safe) + tl.sum(ps * tl.exp2(pm - safe[None, :]), axis=0)
            mx = new
        bv = tl.load(b_ptr + b * s_bb + offs_j.to(tl.int64) * s_bm, mask=in_j, other=1.0).to(tl.float32)
        beta2 = tl.log2(bv) - (mx + tl.log2(tl.where(sm > 0, sm, 1.0)))
        tl.store(beta_ptr + beta_off + b * M + offs_j, beta2 * _LN2, mask=in_j)


@triton.jit(do_not_specialize=["alpha_off", "beta_off"])
def _sinkhorn_check_kernel(
    cost_ptr,  # [B, n, m] cost, strides (s_cb, s_cn, s_cm)
    a_ptr,  # [B, n] row marginal, strides (s_ab, s_an)
    alpha_ptr,  # [S, B, n] fp32 alphas; alpha_k at alpha_off
    beta_ptr,  # [S, B, m] fp32 betas; beta_k at beta_off
    err_ptr,  # [B, R] fp32 out: sum over this row block of |sum_j P_ij - a_i|
    nrun_ptr,  # [B] int32 n_run (frozen: != n_iters)
    alpha_off,  # element offset of alpha_k
    beta_off,  # element offset of beta_k
    B,  # problems
    N,  # rows
    M,  # columns
    R,  # row blocks
    n_iters,  # iterations
    scale,  # -log2(e) / eps
    s_cb,  # cost batch stride (0: shared)
    s_cn,  # cost row stride
    s_cm,  # cost column stride
    s_ab,  # a batch stride
    s_an,  # a row stride
    SHARED: tl.constexpr,  # shared cost: one 2-D tile load for the PB problems
    PB: tl.constexpr,  # problems per program
    BN: tl.constexpr,  # rows per program
    BM: tl.constexpr,  # column tile
):
    # err_b = sum_i | sum_j exp2(M2 + alpha2_i + beta2_j) - a_i |   (the row marginal error)
    offs_p = tl.program_id(0) * PB + tl.arange(0, PB)
    rb = tl.program_id(1)
    in_p = offs_p < B
    live = in_p & (tl.load(nrun_ptr + offs_p, mask=in_p, other=0) == n_iters)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        p64 = offs_p.to(tl.int64)
        offs_i = rb * BN + tl.arange(0, BN)
        in_i = offs_i < N
        alpha2 = _load_vec(alpha_ptr + alpha_off, p64, live, offs_i, N, N, 1, float("-inf")) * _L2E
        rows = tl.zeros([PB, BN], tl.float32)
        for j0 in range(0, M, BM):
            offs_j = j0 + tl.arange(0, BM)
            m2 = _m2_tile(cost_ptr, p64, live, offs_i, offs_j, N, M, scale, s_cb, s_cn, s_cm, SHARED)
            bt = _load_vec(beta_ptr + beta_off, p64, live, offs_j, M, M, 1, float("-inf")) * _L2E
            rows += tl.sum(tl.exp2(m2 + alpha2[:, :, None] + bt[:, None, :]), axis=2)
        av = _load_vec(a_ptr, p64, live, offs_i, N, s_ab, s_an, 0.0)
        err = tl.sum(tl.where(in_i[None, :], tl.abs(rows - av), 0.0), axis=1)
        tl.store(err_ptr + p64 * R + rb, err, mask=live)


@triton.jit(do_not_specialize=["k"])
def _sinkhorn_freeze_kernel(
    err_ptr,  # [B, R] fp32 per-row-block marginal errors (check kernel)
    nrun_ptr,  # [B] int32 n_run, in/out: set to k where the problem freezes
    B,  # problems
    R,  # row blocks
    n_iters,  # iterations (the "not frozen" value)
    k,  # the iteration just checked (1-based)
    tol,  # L1 tolerance on the row marginals
    BB: tl.constexpr,  # problems per program
    BR: tl.constexpr,  # row blocks summed per step
):
    # frozen_b <=> err_b = sum_r err[b, r] <= tol (NaN never freezes); then n_run[b] = k
    offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
    in_b = offs_b < B
    nrun = tl.load(nrun_ptr + offs_b, mask=in_b, other=0)
    live = in_b & (nrun == n_iters)
    err = tl.zeros([BB], tl.float32)
    for r0 in range(0, R, BR):
        offs_r = r0 + tl.arange(0, BR)
        msk = live[:, None] & (offs_r < R)[None, :]
        err += tl.sum(
            tl.load(err_ptr + offs_b.to(tl.int64)[:, None] * R + offs_r[None, :], mask=msk, other=0.0), axis=1
        )
    tl.store(nrun_ptr + offs_b, tl.where(err <= tol, k, nrun), mask=live)


@triton.jit(do_not_specialize=["alpha_off", "beta_off"])
def _sinkhorn_plan_kernel(
    cost_ptr,  # [B, n, m] cost, strides (s_cb, s_cn, s_cm)
    alpha_ptr,  # [S, B, n] fp32 alphas; final at alpha_off
    beta_ptr,  # [S, B, m] fp32 betas; final at beta_off
    plan_ptr,  # [B, n, m] out, contiguous, cost's dtype
    alpha_off,  # element offset of the final alphas
    beta_off,  # element offset of the final betas
    N,  # rows
    M,  # columns
    scale,  # -log2(e) / eps
    s_cb,  # cost batch stride
    s_cn,  # cost row stride
    s_cm,  # cost column stride
    BN: tl.constexpr,  # rows per program
    BM: tl.constexpr,  # columns per program
):
    # P = exp2(M2 + alpha2 1^T + 1 beta2^T)
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_j = tl.program_id(2) * BM + tl.arange(0, BM)
    in_i = offs_i < N
    in_j = offs_j < M
    msk = in_i[:, None] & in_j[None, :]
    i64 = offs_i.to(tl.int64)
    j64 = offs_j.to(tl.int64)
    c = tl.load(cost_ptr + b * s_cb + i64[:, None] * s_cn + j64[None, :] * s_cm, mask=msk, other=0.0)
    al = tl.load(alpha_ptr + alpha_off + b * N + i64, mask=in_i, other=0.0)
    bt = tl.load(beta_ptr + beta_off + b * M + j64, mask=in_j, other=0.0)
    p = tl.exp2(c.to(tl.float32) * scale + (al * _L2E)[:, None] + (bt * _L2E)[None, :])
    tl.store(plan_ptr + b * N * M + i64[:, None] * M + j64[None, :], p.to(plan_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------------- backward kernels
# (torch_impl "Batched log-domain Sinkhorn" backward; per problem only the steps k < n_run[b])
#   W = dP o P;  dM = W;  abar_out = W 1;  bbar = W^T 1
#   step k:  Qb = exp(M + alpha_k 1^T + 1 (beta_k - log b)^T)        (softmax over i)
#            abar = [k == n_run - 1] abar_out - Qb bbar;  dlog b += bbar;  dlog a += abar
#            Qa = exp(M + (alpha_k - log a) 1^T + 1 beta_{k-1}^T)    (softmax over j)
#            dM -= Qb diag(bbar) + diag(abar) Qa;  bbar = -Qa^T abar
#   dC = -dM / eps


@triton.jit
def _m2_tile2(cost_ptr, b, offs_i, offs_j, N, M, scale, s_cb, s_cn, s_cm):
    # [BN, BM] tile of M2 = C * scale for problem b (int64), -inf outside the matrix.
    msk = (offs_i < N)[:, None] & (offs_j < M)[None, :]
    off = b * s_cb + offs_i.to(tl.int64)[:, None] * s_cn + offs_j.to(tl.int64)[None, :] * s_cm
    c = tl.load(cost_ptr + off, mask=msk, other=0.0).to(tl.float32)
    return tl.where(msk, c * scale, float("-inf"))


@triton.jit
def _shift2(pot_ptr, marg_ptr, b, offs, L, s_mb, s_ml):
    # log2-unit (potential - log marginal) over offs [BL] of problem b: -inf where the marginal
    # is 0 (the torch path's _minus_log: the softmax term must vanish) and outside [0, L).
    inb = offs < L
    p2 = tl.load(pot_ptr + b * L + offs, mask=inb, other=0.0) * _L2E
    mv = tl.load(marg_ptr + b * s_mb + offs.to(tl.int64) * s_ml, mask=inb, other=0.0).to(tl.float32)
    return tl.where(inb & (mv > 0), p2 - tl.log2(tl.where(mv > 0, mv, 1.0)), float("-inf"))


@triton.jit(do_not_specialize=["alpha_off", "beta_off"])
def _sinkhorn_bwd_init_kernel(
    grad_ptr,  # [B, n, m] dL/dP, strides (s_gb, s_gn, s_gm)
    cost_ptr,  # [B, n, m] cost, strides (s_cb, s_cn, s_cm)
    alpha_ptr,  # [S, B, n] fp32 alphas; final at alpha_off
    beta_ptr,  # [S, B, m] fp32 betas; final at beta_off
    dm_ptr,  # [B, n, m] fp32 out: dM = W (written when NEED_DM)
    abar_ptr,  # [B, n] fp32 out: abar_out = W 1
    part_ptr,  # [B, R, m] fp32 out: column partial sums of W over this row block
    alpha_off,  # element offset of the final alphas
    beta_off,  # element offset of the final betas
    N,  # rows
    M,  # columns
    R,  # row blocks
    scale,  # -log2(e) / eps
    s_gb,  # grad batch stride
    s_gn,  # grad row stride
    s_gm,  # grad column stride
    s_cb,  # cost batch stride (0: shared)
    s_cn,  # cost row stride
    s_cm,  # cost column stride
    NEED_DM: tl.constexpr,  # the cost gradient is wanted
    BN: tl.constexpr,  # rows per program
    BM: tl.constexpr,  # column tile
):
    # W = dP o exp2(M2 + alpha2 1^T + 1 beta2^T)
    b = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    offs_i = rb * BN + tl.arange(0, BN)
    in_i = offs_i < N
    i64 = offs_i.to(tl.int64)
    al2 = tl.load(alpha_ptr + alpha_off + b * N + i64, mask=in_i, other=float("-inf")) * _L2E
    rows = tl.zeros([BN], tl.float32)
    for j0 in range(0, M, BM):
        offs_j = j0 + tl.arange(0, BM)
        in_j = offs_j < M
        j64 = offs_j.to(tl.int64)
        msk = in_i[:, None] & in_j[None, :]
        m2 = _m2_tile2(cost_ptr, b, offs_i, offs_j, N, M, scale, s_cb, s_cn, s_cm)
        bt2 = tl.load(beta_ptr + beta_off + b * M + j64, mask=in_j, other=float("-inf")) * _L2E
        g = tl.load(grad_ptr + b * s_gb + i64[:, None] * s_gn + j64[None, :] * s_gm, mask=msk, other=0.0)
        w = tl.where(msk, g.to(tl.float32) * tl.exp2(m2 + al2[:, None] + bt2[None, :]), 0.0)
        if NEED_DM:
            tl.store(dm_ptr + b * N * M + i64[:, None] * M + j64[None, :], w, mask=msk)
        rows += tl.sum(w, axis=1)
        tl.store(part_ptr + (b * R + rb) * M + j64, tl.sum(w, axis=0), mask=in_j)
    tl.store(abar_ptr + b * N + i64, rows, mask=in_i)


@triton.jit(do_not_specialize=["k", "alpha_off", "beta_off", "prev_off"])
def _sinkhorn_bwd_step_kernel(
    cost_ptr,  # [B, n, m] cost, strides (s_cb, s_cn, s_cm)
    a_ptr,  # [B, n] row marginal, strides (s_ab, s_an)
    b_ptr,  # [B, m] column marginal, strides (s_bb, s_bm)
    alpha_ptr,  # [S, B, n] fp32 alphas; alpha_k at alpha_off
    beta_ptr,  # [S, B, m] fp32 betas; beta_k at beta_off, beta_{k-1} at prev_off
    bbar_ptr,  # [B, m] fp32 adjoint of beta_k (read)
    abar_out_ptr,  # [B, n] fp32 W 1: the adjoint of the final alpha (problem's first step only)
    dloga_ptr,  # [B, n] fp32 in/out: dL/dlog a += abar
    part_ptr,  # [B, R, m] fp32 out: column partials of -Qa^T abar (the next bbar)
    dm_ptr,  # [B, n, m] fp32 in/out: dM (NEED_DM)
    gout_ptr,  # [B, n, m] out at the step k = 0 (FINAL): grad_cost = -dM / eps, cost's dtype
    nrun_ptr,  # [B] int32 n_run: the problem takes this step when k < n_run
    k,  # the step (0-based iteration index)
    alpha_off,  # element offset of alpha_k
    beta_off,  # element offset of beta_k
    prev_off,  # element offset of beta_{k-1} (read when HAS_PREV)
    N,  # rows
    M,  # columns
    R,  # row blocks
    scale,  # -log2(e) / eps
    neg_inv_eps,  # -1 / eps (grad_cost = dM * neg_inv_eps)
    s_cb,  # cost batch stride (0: shared)
    s_cn,  # cost row stride
    s_cm,  # cost column stride
    s_ab,  # a batch stride
    s_an,  # a row stride
    s_bb,  # b batch stride
    s_bm,  # b column stride
    HAS_PREV: tl.constexpr,  # beta_{k-1} exists (False at k = 0 unrolled: beta_{-1} = 0)
    NEED_DM: tl.constexpr,  # the cost gradient is wanted
    FINAL: tl.constexpr,  # k = 0: write grad_cost instead of dM
    SINGLE: tl.constexpr,  # the whole row is one tile: one cost read per step
    BN: tl.constexpr,  # rows per program
    BM: tl.constexpr,  # column tile
):
    b = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    nrun = tl.load(nrun_ptr + b)
    if k < nrun:
        offs_i = rb * BN + tl.arange(0, BN)
        in_i = offs_i < N
        i64 = offs_i.to(tl.int64)
        al2 = tl.load(alpha_ptr + alpha_off + b * N + i64, mask=in_i, other=float("-inf")) * _L2E
        ash2 = _shift2(alpha_ptr + alpha_off, a_ptr, b, offs_i, N, s_ab, s_an)
        first = tl.load(abar_out_ptr + b * N + i64, mask=in_i, other=0.0)
        abar = tl.where(k == nrun - 1, first, 0.0)
        row = (b * N + i64)[:, None] * M  # [BN, 1] int64 rows of dM / grad_cost
        part = (b * R + rb) * M
        if SINGLE:
            offs_j = tl.arange(0, BM)
            in_j = offs_j < M
            j64 = offs_j.to(tl.int64)
            m2 = _m2_tile2(cost_ptr, b, offs_i, offs_j, N, M, scale, s_cb, s_cn, s_cm)
            bsh2 = _shift2(beta_ptr + beta_off, b_ptr, b, offs_j, M, s_bb, s_bm)
            bb = tl.load(bbar_ptr + b * M + j64, mask=in_j, other=0.0)
            qb = tl.exp2(m2 + al2[:, None] + bsh2[None, :])
            abar = tl.where(in_i, abar - tl.sum(qb * bb[None, :], axis=1), 0.0)
            if HAS_PREV:
                bp2 = tl.load(beta_ptr + prev_off + b * M + j64, mask=in_j, other=0.0) * _L2E
                qa = tl.exp2(m2 + ash2[:, None] + bp2[None, :])
            else:
                qa = tl.exp2(m2 + ash2[:, None])
            tl.store(part_ptr + part + j64, -tl.sum(qa * abar[:, None], axis=0), mask=in_j)
            if NEED_DM:
                msk = in_i[:, None] & in_j[None, :]
                d = tl.load(dm_ptr + row + j64[None, :], mask=msk, other=0.0)
                d = d - qb * bb[None, :] - abar[:, None] * qa
                if FINAL:
                    tl.store(gout_ptr + row + j64[None, :], (d * neg_inv_eps).to(gout_ptr.dtype.element_ty), mask=msk)
                else:
                    tl.store(dm_ptr + row + j64[None, :], d, mask=msk)
        else:
            # sweep 1: abar = abar_in - Qb bbar over all columns
            for j0 in range(0, M, BM):
                offs_j = j0 + tl.arange(0, BM)
                j64 = offs_j.to(tl.int64)
                m2 = _m2_tile2(cost_ptr, b, offs_i, offs_j, N, M, scale, s_cb, s_cn, s_cm)
                bsh2 = _shift2(beta_ptr + beta_off, b_ptr, b, offs_j, M, s_bb, s_bm)
                bb = tl.load(bbar_ptr + b * M + j64, mask=offs_j < M, other=0.0)
                abar -= tl.sum(tl.exp2(m2 + al2[:, None] + bsh2[None, :]) * bb[None, :], axis=1)
            abar = tl.where(in_i, abar, 0.0)
            # sweep 2 (same tiles, L2-resident): Qa, the bbar partials, dM
            for j0 in range(0, M, BM):
                offs_j = j0 + tl.arange(0, BM)
                in_j = offs_j < M
                j64 = offs_j.to(tl.int64)
                m2 = _m2_tile2(cost_ptr, b, offs_i, offs_j, N, M, scale, s_cb, s_cn, s_cm)
                if HAS_PREV:
                    bp2 = tl.load(beta_ptr + prev_off + b * M + j64, mask=in_j, other=0.0) * _L2E
                    qa = tl.exp2(m2 + ash2[:, None] + bp2[None, :])
                else:
                    qa = tl.exp2(m2 + ash2[:, None])
                tl.store(part_ptr + part + j64, -tl.sum(qa * abar[:, None], axis=0), mask=in_j)
                if NEED_DM:
                    bsh2 = _shift2(beta_ptr + beta_off, b_ptr, b, offs_j, M, s_bb, s_bm)
                    bb = tl.load(bbar_ptr + b * M + j64, mask=in_j, other=0.0)
                    qb = tl.exp2(m2 + al2[:, None] + bsh2[None, :])
                    msk = in_i[:, None] & in_j[None, :]
                    d = tl.load(dm_ptr + row + j64[None, :], mask=msk, other=0.0)
                    d = d - qb * bb[None, :] - abar[:, None] * qa
                    if FINAL:
                        gv = (d * neg_inv_eps).to(gout_ptr.dtype.element_ty)
                        tl.store(gout_ptr + row + j64[None, :], gv, mask=msk)
                    else:
                        tl.store(dm_ptr + row + j64[None, :], d, mask=msk)
        dl = tl.load(dloga_ptr + b * N + i64, mask=in_i, other=0.0)
        tl.store(dloga_ptr + b * N + i64, dl + abar, mask=in_i)


@triton.jit(do_not_specialize=["k"])
def _sinkhorn_bwd_col_kernel(
    part_ptr,  # [B, R, m] fp32 column partials (init: W^T 1; step: -Qa^T abar)
    bbar_ptr,  # [B, m] fp32 in/out: the beta adjoint
    dlogb_ptr,  # [B, m] fp32 in/out: dL/dlog b += bbar (steps only)
    nrun_ptr,  # [B] int32 n_run: the problem took step k when k < n_run
    k,  # the step just taken (-1 for INIT)
    M,  # columns
    R,  # row blocks
    INIT: tl.constexpr,  # True after the init kernel: bbar = W^T 1, no dlog b
    BC: tl.constexpr,  # columns per program
    BR: tl.constexpr,  # partial rows summed per step
):
    # INIT: bbar = sum_r part;  step: dlog b += bbar, bbar = sum_r part
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if k < tl.load(nrun_ptr + b):  # INIT passes k = -1 (n_run >= 1): always
        offs_j = pid_c * BC + tl.arange(0, BC)
        in_j = offs_j < M
        acc = tl.zeros([BC], tl.float32)
        for r0 in range(0, R, BR):
            offs_r = r0 + tl.arange(0, BR)
            msk = (offs_r < R)[:, None] & in_j[None, :]
            idx = (b * R + offs_r.to(tl.int64))[:, None] * M + offs_j[None, :]
            acc += tl.sum(tl.load(part_ptr + idx, mask=msk, other=0.0), axis=0)
        if not INIT:
            old = tl.load(bbar_ptr + b * M + offs_j, mask=in_j, other=0.0)
            dl = tl.load(dlogb_ptr + b * M + offs_j, mask=in_j, other=0.0)
            tl.store(dlogb_ptr + b * M + offs_j, dl + old, mask=in_j)
        tl.store(bbar_ptr + b * M + offs_j, acc, mask=in_j)


@triton.jit
def _sinkhorn_bwd_implicit_kernel(
    grad_ptr,  # [B, n, m] dL/dP, strides (s_gb, s_gn, s_gm)
    cost_ptr,  # [B, n, m] cost, strides (s_cb, s_cn, s_cm)
    a_ptr,  # [B, n] row marginal, strides (s_ab, s_an)
    b_ptr,  # [B, m] column marginal, strides (s_bb, s_bm)
    alpha_ptr,  # [1, B, n] fp32 final alphas
    beta_ptr,  # [1, B, m] fp32 final betas
    dloga_ptr,  # [B, n] fp32 sum over the steps of abar
    dlogb_ptr,  # [B, m] fp32 sum over the steps of bbar
    gout_ptr,  # [B, n, m] out: grad_cost in the cost's dtype, contiguous
    N,  # rows
    M,  # columns
    scale,  # -log2(e) / eps
    neg_inv_eps,  # -1 / eps
    s_gb,  # grad batch stride
    s_gn,  # grad row stride
    s_gm,  # grad column stride
    s_cb,  # cost batch stride (0: shared)
    s_cn,  # cost row stride
    s_cm,  # cost column stride
    s_ab,  # a batch stride
    s_an,  # a row stride
    s_bb,  # b batch stride
    s_bm,  # b column stride
    BN: tl.constexpr,  # rows per program
    BM: tl.constexpr,  # columns per program
):
    # Implicit mode: Qa, Qb use the final potentials in every step, so the dM updates of all steps
    # sum to Qb diag(sum bbar) + diag(sum abar) Qa = Qb diag(dlog b) + diag(dlog a) Qa and
    #   grad_cost = -(W - Qb diag(dlog b) - diag(dlog a) Qa) / eps
    # in one pass at the end: no [B, n, m] dM buffer, no per-step read-modify-write.
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_j = tl.program_id(2) * BM + tl.arange(0, BM)
    in_i = offs_i < N
    in_j = offs_j < M
    i64 = offs_i.to(tl.int64)
    j64 = offs_j.to(tl.int64)
    msk = in_i[:, None] & in_j[None, :]
    m2 = _m2_tile2(cost_ptr, b, offs_i, offs_j, N, M, scale, s_cb, s_cn, s_cm)
    al2 = tl.load(alpha_ptr + b * N + i64, mask=in_i, other=float("-inf")) * _L2E
    bt2 = tl.load(beta_ptr + b * M + j64, mask=in_j, other=float("-inf")) * _L2E
    ash2 = _shift2(alpha_ptr, a_ptr, b, offs_i, N, s_ab, s_an)
    bsh2 = _shift2(beta_ptr, b_ptr, b, offs_j, M, s_bb, s_bm)
    g = tl.load(grad_ptr + b * s_gb + i64[:, None] * s_gn + j64[None, :] * s_gm, mask=msk, other=0.0)
    w = g.to(tl.float32) * tl.exp2(m2 + al2[:, None] + bt2[None, :])
    da = tl.load(dloga_ptr + b * N + i64, mask=in_i, other=0.0)
    db = tl.load(dlogb_ptr + b * M + j64, mask=in_j, other=0.0)
    d = (
        w
        - tl.exp2(m2 + al2[:, None] + bsh2[None, :]) * db[None, :]
        - da[:, None] * tl.exp2(m2 + ash2[:, None] + bt2[None, :])
    )
    gv = (d * neg_inv_eps).to(gout_ptr.dtype.element_ty)
    tl.store(gout_ptr + b * N * M + i64[:, None] * M + j64[None, :], gv, mask=msk)


# ----------------------------------------------------------------------------------- launchers


def _check(cost: torch.Tensor, n_iters: int) -> None:
    if cost.dim() != 3:
        raise ValueError(f"sinkhorn (triton): cost must be [B, n, m], got shape {tuple(cost.shape)}")
    if n_iters < 1:
        raise ValueError(f"sinkhorn (triton): n_iters must be >= 1, got {n_iters}")


def sinkhorn_fwd_triton(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: float,
    n_iters: int,
    tol: float,
    check_every: int,
    implicit: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched log-domain Sinkhorn (op contract of kd_kernels/ops/sinkhorn.py).

    cost [B, n, m] (fp32 / fp16 / bf16, any strides, stride 0 over B for a shared cost), a [B, n],
    b [B, m] (stride-0 expands allowed). Returns (plan [B, n, m] in cost's dtype, alphas [S, B, n],
    betas [S, B, m] fp32 scaled potentials, n_run [B] int32) with S = 1 when ``implicit`` else
    ``n_iters``. tol > 0: after iteration k with k % check_every == 0 and k < n_iters a problem whose
    L1 row-marginal error is <= tol freezes (n_run = k), on the device.
    """
    _check(cost, n_iters)
    nb, n, m = cost.shape
    cfg = _config()
    opts = _launch_opts(cfg)
    dev = cost.device
    shared = nb > 1 and cost.stride(0) == 0
    pb = min(cfg["GROUP"], triton.next_power_of_2(nb)) if shared else 1
    bn, bm, single, rs = _geometry(n, m, pb, cfg["TILE"], cfg)
    nr = triton.cdiv(n, bn * rs)  # row programs = partial rows
    nr_check = triton.cdiv(n, bn)
    slots = 1 if implicit else n_iters
    alphas = torch.empty(slots, nb, n, device=dev, dtype=torch.float32)
    betas = torch.empty(slots, nb, m, device=dev, dtype=torch.float32)
    n_run = torch.full((nb,), n_iters, device=dev, dtype=torch.int32)
    pmax = torch.empty(nb, nr, m, device=dev, dtype=torch.float32)
    psum = torch.empty_like(pmax)
    check = tol > 0
    err = torch.empty(nb, nr_check, device=dev, dtype=torch.float32) if check else None
    scale = -1.4426950408889634 / float(epsilon)
    sc, sa, sb = cost.stride(), a.stride(), b.stride()
    grid_rows = (triton.cdiv(nb, pb), nr)
    grid_check = (triton.cdiv(nb, pb), nr_check)
    grid_cols = (triton.cdiv(m, cfg["BLOCK_C"]), nb)
    for k in range(n_iters):
        slot = 0 if implicit else k
        prev = 0 if implicit else max(k - 1, 0)
        _sinkhorn_row_kernel[grid_rows](
            cost, a, betas, alphas, pmax, psum, n_run, prev * nb * m, slot * nb * n,
            nb, n, m, nr, n_iters, scale, sc[0], sc[1], sc[2], sa[0], sa[1],
            HAS_BETA=k > 0, SHARED=shared, SINGLE=single, RS=rs, PB=pb, BN=bn, BM=bm, **opts,
        )  # fmt: skip
        _sinkhorn_col_kernel[grid_cols](
            pmax, psum, b, betas, n_run, slot * nb * m, m, nr, n_iters, sb[0], sb[1],
            BC=cfg["BLOCK_C"], BR=cfg["BLOCK_R"], **opts,
        )  # fmt: skip
        it = k + 1
        if check and it % check_every == 0 and it < n_iters:
            _sinkhorn_check_kernel[grid_check](
                cost, a, alphas, betas, err, n_run, slot * nb * n, slot * nb * m,
                nb, n, m, nr_check, n_iters, scale, sc[0], sc[1], sc[2], sa[0], sa[1],
                SHARED=shared, PB=pb, BN=bn, BM=bm, **opts,
            )  # fmt: skip
            _sinkhorn_freeze_kernel[(triton.cdiv(nb, cfg["BLOCK_B"]),)](
                err, n_run, nb, nr_check, n_iters, it, float(tol), BB=cfg["BLOCK_B"], BR=cfg["BLOCK_R"], **opts
            )
    if check and not implicit:
        # rows k >= n_run[b] of a frozen problem repeat its last potentials (one device gather)
        last = torch.minimum(torch.arange(slots, device=dev)[:, None], (n_run.long() - 1)[None, :])
        alphas = alphas.gather(0, last[:, :, None].expand(slots, nb, n))
        betas = betas.gather(0, last[:, :, None].expand(slots, nb, m))
    plan = torch.empty(nb, n, m, device=dev, dtype=cost.dtype)
    pbn, pbm, _, _ = _geometry(n, m, 1, cfg["TILE"], cfg)
    _sinkhorn_plan_kernel[(nb, triton.cdiv(n, pbn), triton.cdiv(m, pbm))](
        cost, alphas, betas, plan, (slots - 1) * nb * n, (slots - 1) * nb * m, n, m, scale,
        sc[0], sc[1], sc[2], BN=pbn, BM=pbm, **opts,
    )  # fmt: skip
    return plan, alphas, betas, n_run


def sinkhorn_bwd_triton(
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
    """Reverse recurrence of :func:`sinkhorn_fwd_triton` (unrolled, or the implicit adjoint
    fixed-point iteration with the final potentials): (grad_cost, grad_a, grad_b) in the dtypes of
    cost / a / b, None where not needed. Problem b takes n_run[b] steps."""
    _check(cost, n_iters)
    nb, n, m = cost.shape
    cfg = _config()
    opts = _launch_opts(cfg)
    dev = cost.device
    bn, bm, single, _ = _geometry(n, m, 1, cfg["BWD_TILE"], cfg)
    nr = triton.cdiv(n, bn)
    alphas = alphas.float().contiguous()
    betas = betas.float().contiguous()
    n_run = n_run.to(torch.int32).contiguous()
    fin = alphas.shape[0] - 1  # the final potentials' slot
    f32 = {"device": dev, "dtype": torch.float32}
    abar_out = torch.empty(nb, n, **f32)
    dloga = torch.zeros(nb, n, **f32)
    dlogb = torch.zeros(nb, m, **f32)
    bbar = torch.empty(nb, m, **f32)
    part = torch.empty(nb, nr, m, **f32)
    step_dm = need_cost and not implicit  # implicit: dM in one pass at the end (no buffer)
    if step_dm:
        dm = torch.empty(nb, n, m, **f32)
        gout = dm if cost.dtype == torch.float32 else torch.empty(nb, n, m, device=dev, dtype=cost.dtype)
    else:
        dm = gout = abar_out  # never touched (NEED_DM = False)
    scale = -1.4426950408889634 / float(epsilon)
    sg, sc, sa, sb = grad.stride(), cost.stride(), a.stride(), b.stride()
    grid_rows = (nb, nr)
    grid_cols = (triton.cdiv(m, cfg["BLOCK_C"]), nb)
    _sinkhorn_bwd_init_kernel[grid_rows](
        grad, cost, alphas, betas, dm, abar_out, part, fin * nb * n, fin * nb * m, n, m, nr, scale,
        sg[0], sg[1], sg[2], sc[0], sc[1], sc[2], NEED_DM=step_dm, BN=bn, BM=bm, **opts,
    )  # fmt: skip
    _sinkhorn_bwd_col_kernel[grid_cols](
        part, bbar, dlogb, n_run, -1, m, nr, INIT=True, BC=cfg["BLOCK_C"], BR=cfg["BLOCK_R"], **opts
    )
    for k in range(n_iters - 1, -1, -1):
        slot = 0 if implicit else k
        prev = 0 if implicit else max(k - 1, 0)
        _sinkhorn_bwd_step_kernel[grid_rows](
            cost, a, b, alphas, betas, bbar, abar_out, dloga, part, dm, gout, n_run, k,
            slot * nb * n, slot * nb * m, prev * nb * m, n, m, nr, scale, -1.0 / float(epsilon),
            sc[0], sc[1], sc[2], sa[0], sa[1], sb[0], sb[1],
            HAS_PREV=implicit or k > 0, NEED_DM=step_dm, FINAL=k == 0, SINGLE=single, BN=bn, BM=bm, **opts,
        )  # fmt: skip
        _sinkhorn_bwd_col_kernel[grid_cols](
            part, bbar, dlogb, n_run, k, m, nr, INIT=False, BC=cfg["BLOCK_C"], BR=cfg["BLOCK_R"], **opts
        )
    if need_cost and implicit:
        gout = torch.empty(nb, n, m, device=dev, dtype=cost.dtype)
        pbn, pbm, _, _ = _geometry(n, m, 1, cfg["BWD_TILE"], cfg)
        _sinkhorn_bwd_implicit_kernel[(nb, triton.cdiv(n, pbn), triton.cdiv(m, pbm))](
            grad, cost, a, b, alphas, betas, dloga, dlogb, gout, n, m, scale, -1.0 / float(epsilon),
            sg[0], sg[1], sg[2], sc[0], sc[1], sc[2], sa[0], sa[1], sb[0], sb[1], BN=pbn, BM=pbm, **opts,
        )  # fmt: skip
    g_cost = gout if need_cost else None
    g_a = (dloga / a.float()).to(a.dtype) if need_a else None
    g_b = (dlogb / b.float()).to(b.dtype) if need_b else None
    return g_cost, g_a, g_b
