"""Triton kernels for the RKD distance and angle losses (forward and backward).

Semantics are those of lenscloth/RKD (``RkdDistance``, ``RKdAngle``; LOSSES.md §2.1); the
launchers at the bottom have the signatures of ``kd_kernels.torch_impl.rkd`` with the suffix
``_triton`` and are plugged into the ``kd_kernels::rkd_*`` ops for ``backend="triton"``.

Shared building block: every kernel forms pairwise squared distances of *column-centred*
rows, E_ij = |x_i|^2 + |x_j|^2 - 2 x_i.x_j, on [BLOCK_M, BLOCK_N] tiles from ``tl.dot`` over
D chunks (flash-attention style: nothing N x D is copied, nothing N x N is stored by the
distance kernels). Centring is exact for these translation-invariant losses and removes most
of the Gram route's cancellation error.

Duplicated rows. The reference computes explicit differences (angle) or clamps at 1e-12
(distance), so identical rows have exactly zero squared distance there, while the fp32 Gram
route leaves a rounding residue (up to ~1e-6 of |x_i|^2 + |x_j|^2). As the PyTorch path does,
identical rows are recognised exactly from their bits with ``torch_impl.rkd.row_keys`` (an
O(N D) hash computed once per call, passed to the kernels as one int64 key per row): equal
keys mean E_ij := 0, i.e. distance 1e-6 from the clamp with zero gradient, and psi = 0 at
such a pair. Distinct but nearly coincident rows are resolved to Gram-route precision only.

Precision: loads happen in the input dtype (fp32, fp16, bf16; float64 is accepted but
computed in fp32, with results and saved means returned in float64 as the op's fake
declares). Tiles are cast to fp32 before ``tl.dot`` (the interpreter's bf16 dot is broken,
and it keeps parity), accumulation is fp32, and fp32 dots use ``input_precision="ieee"`` (no
TF32). Row and pair offsets are int64.

Passes and memory. Distance forward: pass 1 sums the distances per tile (a [tiles, 2] buffer
summed by torch: no host sync) for mu_s, mu_t; pass 2 sums the smooth-L1 terms (or stores
the [N, N] "none" output). Distance backward: a statistics pass (the path through mu), then
one pass per needed gradient that recomputes the tiles and adds rowsum(A) X - A X into dX
with atomics over D chunks: O(N + D) extra memory, no N x N buffer. Angle: two [N, N] fp32
buffers E_s, E_t (forward and backward), the N^3 triple loop tiled over (anchor, b tile)
looping over c tiles (forward) or over (b tile, c tile, anchor split) looping over anchors
(backward, which accumulates one [N, N] dLoss/dE per needed gradient with atomics, then one
GEMM). Atomics make the gradients' last bits order-dependent on GPU.

Configs: one fixed configuration per kernel (no autotuning): 32-wide tiles under the
interpreter (cheap to interpret, and a 70-row test spans three tiles), 64-wide on GPU.
Autotuning was left out because no GPU was available to validate it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kd_kernels._backend import TRITON_INTERPRET
from kd_kernels.torch_impl.rkd import compute_dtype, row_keys

__all__ = [
    "rkd_angle_bwd_triton",
    "rkd_angle_fwd_triton",
    "rkd_distance_bwd_triton",
    "rkd_distance_fwd_triton",
]

# The reference's clamp on squared distances (lenscloth/RKD pdist eps) and F.normalize's eps
# on norms (angle loss).
_CLAMP = 1e-12
# Angle: E_ij below 8 ulp of fp32 times |x_i|^2 + |x_j|^2 is rounding noise (as torch_impl.rkd).
_GRAM_FLOOR = 8 * 2.0**-23

# Pairwise tiles: 64x64 keeps a fp32 Gram tile at 32 registers per thread with 4 warps on
# GPU; 32 under the interpreter, whose cost grows with the tile area per op.
_BLOCK_PAIR = 32 if TRITON_INTERPRET else 64
# D chunk of the Gram K-loop: 32 fp32 columns = 128-byte rows per load, a multiple of the
# tensor-core K step; also the chunk of the backward's dX update.
_BLOCK_K = 32
# 4 warps for the Gram tiles (a 64x64x32 dot per step), 8 for the angle kernels whose
# per-tile elementwise work dominates.
_WARPS_DIST = 4
_WARPS_ANGLE = 8
# Angle backward: anchors are split over a third grid axis until about this many programs
# exist (several waves on a 132-SM GPU); under the interpreter one split is cheapest.
_TARGET_PROGRAMS = 1024


# ---------------------------------------------------------------------------------------------
# Shared tile helpers
# ---------------------------------------------------------------------------------------------
#   xc_i = x_i - mean(x)                         (column-centred rows, fp32)
#   E_ij = |xc_i|^2 + |xc_j|^2 - 2 xc_i.xc_j     (Gram route, tl.dot over D chunks), clamped at 0
#   distinct_ij = key_i != key_j                 (False on the diagonal and for identical rows)
#   E_ij := 0 where not distinct_ij
@triton.jit
def _centred_sqdist_tile(
    x_ptr,  # [N, D] features, any float dtype, strides (stride_n, stride_d)
    mean_ptr,  # [D] fp32 column mean of x
    keys_ptr,  # [N] int64 row keys of x (equal for bit-identical rows)
    stride_n,  # row stride of x (elements)
    stride_d,  # column stride of x (elements)
    N,  # rows
    D,  # feature width
    offs_i,  # [BLOCK_M] int32 row indices of the tile
    offs_j,  # [BLOCK_N] int32 column indices of the tile
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # D chunk per tl.dot
):
    # Returns (E tile [BLOCK_M, BLOCK_N] fp32, distinct mask). Out-of-bounds rows are zeros.
    row_i = offs_i.to(tl.int64) * stride_n
    row_j = offs_j.to(tl.int64) * stride_n
    in_i = offs_i < N
    in_j = offs_j < N
    gram = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sq_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    sq_j = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < D
        col = offs_k.to(tl.int64) * stride_d
        mu = tl.load(mean_ptr + offs_k, mask=in_k, other=0.0)
        m_i = in_i[:, None] & in_k[None, :]
        m_j = in_j[:, None] & in_k[None, :]
        xi = tl.load(x_ptr + row_i[:, None] + col[None, :], mask=m_i, other=0.0).to(tl.float32)
        xj = tl.load(x_ptr + row_j[:, None] + col[None, :], mask=m_j, other=0.0).to(tl.float32)
        xi = tl.where(m_i, xi - mu[None, :], 0.0)
        xj = tl.where(m_j, xj - mu[None, :], 0.0)
        gram += tl.dot(xi, tl.trans(xj), input_precision="ieee")
        sq_i += tl.sum(xi * xi, axis=1)
        sq_j += tl.sum(xj * xj, axis=1)
    key_i = tl.load(keys_ptr + offs_i, mask=in_i, other=0)
    key_j = tl.load(keys_ptr + offs_j, mask=in_j, other=0)
    distinct = (key_i[:, None] != key_j[None, :]) & (offs_i[:, None] != offs_j[None, :])
    e = tl.maximum(sq_i[:, None] + sq_j[None, :] - 2.0 * gram, 0.0)
    return tl.where(distinct, e, 0.0), distinct


@triton.jit
def _clamped_dist(e, CLAMP: tl.constexpr):
    # d = sqrt(max(E, 1e-12)) as the reference's pdist (the diagonal is handled by callers)
    return tl.sqrt_rn(tl.maximum(e, CLAMP))


@triton.jit
def _smooth_l1(x):
    # h(x) = x^2/2 if |x| < 1 else |x| - 1/2   (PyTorch smooth_l1_loss, beta = 1)
    ax = tl.abs(x)
    return tl.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


@triton.jit
def _upstream_pair_grad(
    grad_ptr,  # 0-dim upstream grad (scalar reductions) or [N, N] (reduction="none")
    stride_g0,  # row stride of the [N, N] grad (unused for a scalar)
    stride_g1,  # column stride of the [N, N] grad (unused for a scalar)
    grad_scale,  # fp32 factor: 1/N^2 for "mean", 1 otherwise
    offs_i,  # [BLOCK_M] rows of the tile
    offs_j,  # [BLOCK_N] columns of the tile
    mask,  # [BLOCK_M, BLOCK_N] in-bounds mask
    GRAD_IS_MATRIX: tl.constexpr,  # True for reduction="none"
):
    # Returns (G_ij, G_ji): dLoss/dh_ij and dLoss/dh_ji on the tile.
    if GRAD_IS_MATRIX:
        ri = offs_i.to(tl.int64)
        rj = offs_j.to(tl.int64)
        g_ij = tl.load(grad_ptr + ri[:, None] * stride_g0 + rj[None, :] * stride_g1, mask=mask, other=0.0)
        g_ji = tl.load(grad_ptr + rj[None, :] * stride_g0 + ri[:, None] * stride_g1, mask=mask, other=0.0)
        return g_ij.to(tl.float32) * grad_scale, g_ji.to(tl.float32) * grad_scale
    else:
        g = tl.load(grad_ptr).to(tl.float32) * grad_scale
        return g, g


# ---------------------------------------------------------------------------------------------
# RKD distance
# ---------------------------------------------------------------------------------------------
# Forward (per network):  d_ij = sqrt(max(E_ij, 1e-12)) for i != j, d_ii = 0;
#   mu = sum_{i != j} d_ij / (N (N - 1));   d^_ij = d_ij / mu
#   loss_ij = h(d^s_ij - d^t_ij)   (smooth-L1, beta 1)
#   "mean": sum_ij loss_ij / N^2;  "sum": sum_ij loss_ij;  "none": the [N, N] loss_ij.
# Pass 1 (_rkd_distance_mean_kernel): per-tile partial sums of d_s and d_t -> mu (torch sum).
# Pass 2 (_rkd_distance_fwd_kernel): per-tile partial sums of loss_ij (or the [N, N] store).
@triton.jit
def _rkd_distance_mean_kernel(
    s_ptr,  # [N, Ds] student features
    t_ptr,  # [N, Dt] teacher features
    s_mean_ptr,  # [Ds] fp32 column mean of the student
    t_mean_ptr,  # [Dt] fp32 column mean of the teacher
    s_keys_ptr,  # [N] int64 row keys of the student
    t_keys_ptr,  # [N] int64 row keys of the teacher
    partial_ptr,  # [num_programs, 2] fp32 out: per-tile sums of d_s and d_t (off-diagonal)
    N,  # rows
    Ds,  # student width
    Dt,  # teacher width
    stride_sn,  # student row stride
    stride_sd,  # student column stride
    stride_tn,  # teacher row stride
    stride_td,  # teacher column stride
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # D chunk
    CLAMP: tl.constexpr,  # squared-distance clamp (1e-12)
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    off_diag = (offs_i[:, None] < N) & (offs_j[None, :] < N) & (offs_i[:, None] != offs_j[None, :])
    e_s, _ = _centred_sqdist_tile(
        s_ptr, s_mean_ptr, s_keys_ptr, stride_sn, stride_sd, N, Ds, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K
    )
    e_t, _ = _centred_sqdist_tile(
        t_ptr, t_mean_ptr, t_keys_ptr, stride_tn, stride_td, N, Dt, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K
    )
    d_s = tl.where(off_diag, _clamped_dist(e_s, CLAMP), 0.0)
    d_t = tl.where(off_diag, _clamped_dist(e_t, CLAMP), 0.0)
    pid = pid_i * tl.num_programs(1) + pid_j
    tl.store(partial_ptr + 2 * pid, tl.sum(tl.sum(d_s, axis=1), axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.sum(d_t, axis=1), axis=0))


@triton.jit
def _normalised_dists(
    s_ptr, t_ptr, s_mean_ptr, t_mean_ptr, s_keys_ptr, t_keys_ptr, mu_ptr, N, Ds, Dt,
    stride_sn, stride_sd, stride_tn, stride_td, offs_i, offs_j,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CLAMP: tl.constexpr,
):  # fmt: skip
    # Arguments as in _rkd_distance_mean_kernel; mu_ptr: [2] fp32 (mu_s, mu_t).
    # Returns d^s, d^t (0 on the diagonal and out of bounds), and E_s, distinct_s of the tile.
    off_diag = (offs_i[:, None] < N) & (offs_j[None, :] < N) & (offs_i[:, None] != offs_j[None, :])
    e_s, distinct_s = _centred_sqdist_tile(
        s_ptr, s_mean_ptr, s_keys_ptr, stride_sn, stride_sd, N, Ds, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K
    )
    e_t, _ = _centred_sqdist_tile(
        t_ptr, t_mean_ptr, t_keys_ptr, stride_tn, stride_td, N, Dt, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K
    )
    # d * (1/mu) keeps the reference's 0/0 = NaN for N = 1 (an empty mean) instead of hiding it
    dh_s = tl.where(off_diag, _clamped_dist(e_s, CLAMP), 0.0) * (1.0 / tl.load(mu_ptr))
    dh_t = tl.where(off_diag, _clamped_dist(e_t, CLAMP), 0.0) * (1.0 / tl.load(mu_ptr + 1))
    return dh_s, dh_t, e_s, distinct_s


@triton.jit
def _rkd_distance_fwd_kernel(
    s_ptr,  # [N, Ds] student features
    t_ptr,  # [N, Dt] teacher features
    s_mean_ptr,  # [Ds] fp32 column mean of the student
    t_mean_ptr,  # [Dt] fp32 column mean of the teacher
    s_keys_ptr,  # [N] int64 row keys of the student
    t_keys_ptr,  # [N] int64 row keys of the teacher
    mu_ptr,  # [2] fp32 (mu_s, mu_t) from pass 1
    out_ptr,  # REDUCE_NONE: [N, N] contiguous loss in the student dtype; else [num_programs] fp32 partials
    N,  # rows
    Ds,  # student width
    Dt,  # teacher width
    stride_sn,  # student row stride
    stride_sd,  # student column stride
    stride_tn,  # teacher row stride
    stride_td,  # teacher column stride
    REDUCE_NONE: tl.constexpr,  # store per-pair losses instead of per-tile sums
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # D chunk
    CLAMP: tl.constexpr,  # squared-distance clamp (1e-12)
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_b = (offs_i[:, None] < N) & (offs_j[None, :] < N)
    dh_s, dh_t, _, _ = _normalised_dists(
        s_ptr, t_ptr, s_mean_ptr, t_mean_ptr, s_keys_ptr, t_keys_ptr, mu_ptr, N, Ds, Dt,
        stride_sn, stride_sd, stride_tn, stride_td, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, CLAMP,
    )  # fmt: skip
    h = _smooth_l1(dh_s - dh_t)
    if REDUCE_NONE:
        tl.store(out_ptr + offs_i.to(tl.int64)[:, None] * N + offs_j[None, :], h, mask=in_b)
    else:
        h = tl.where(in_b, h, 0.0)
        tl.store(out_ptr + pid_i * tl.num_programs(1) + pid_j, tl.sum(tl.sum(h, axis=1), axis=0))


# Backward (LOSSES.md §2.3; FD-checked there). With G_ij = dLoss/dh_ij (grad/N^2, grad, or
# the "none" grad matrix), h'(x) = clamp(x, -1, 1), M = N (N - 1) and sign = +1 for the
# student, -1 for the teacher (h depends on d^s - d^t):
#   g_ij = sign G_ij h'(d^s_ij - d^t_ij)
#   c    = (1/M) sum_ij g_ij d^_ij                   (the path through mu; pass B1)
#   w_ij = (g_ij - c) / mu = dLoss/dd_ij             (i != j)
#   A_ij = (w_ij + w_ji) / d_ij  on live pairs: distinct rows with E_ij >= 1e-12 (the clamp
#          passes no gradient)
#   dX   = (diag(A 1) - A) X = rowsum(A) * X - A X   (X centred: rows of the Laplacian sum to 0)
# Pass B2 recomputes every tile, forms A, and adds rowsum(A)_i x_i - A_ij x_j into dX[i] with
# atomics over D chunks: no N x N buffer.
@triton.jit
def _rkd_distance_bwd_stats_kernel(
    s_ptr,  # [N, Ds] student features
    t_ptr,  # [N, Dt] teacher features
    s_mean_ptr,  # [Ds] fp32 column mean of the student
    t_mean_ptr,  # [Dt] fp32 column mean of the teacher
    s_keys_ptr,  # [N] int64 row keys of the student
    t_keys_ptr,  # [N] int64 row keys of the teacher
    mu_ptr,  # [2] fp32 (mu_s, mu_t)
    grad_ptr,  # upstream grad: 0-dim, or [N, N] when GRAD_IS_MATRIX
    stride_g0,  # grad row stride
    stride_g1,  # grad column stride
    grad_scale,  # 1/N^2 for "mean", else 1
    partial_ptr,  # [num_programs, 2] fp32 out: per-tile sums of G h' d^s and G h' d^t
    N,  # rows
    Ds,  # student width
    Dt,  # teacher width
    stride_sn,  # student row stride
    stride_sd,  # student column stride
    stride_tn,  # teacher row stride
    stride_td,  # teacher column stride
    GRAD_IS_MATRIX: tl.constexpr,  # reduction="none"
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # D chunk
    CLAMP: tl.constexpr,  # squared-distance clamp (1e-12)
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_b = (offs_i[:, None] < N) & (offs_j[None, :] < N)
    dh_s, dh_t, _, _ = _normalised_dists(
        s_ptr, t_ptr, s_mean_ptr, t_mean_ptr, s_keys_ptr, t_keys_ptr, mu_ptr, N, Ds, Dt,
        stride_sn, stride_sd, stride_tn, stride_td, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, CLAMP,
    )  # fmt: skip
    g_ij, _ = _upstream_pair_grad(grad_ptr, stride_g0, stride_g1, grad_scale, offs_i, offs_j, in_b, GRAD_IS_MATRIX)
    g = tl.where(in_b, g_ij * tl.minimum(tl.maximum(dh_s - dh_t, -1.0), 1.0), 0.0)
    pid = pid_i * tl.num_programs(1) + pid_j
    tl.store(partial_ptr + 2 * pid, tl.sum(tl.sum(g * dh_s, axis=1), axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.sum(g * dh_t, axis=1), axis=0))


@triton.jit
def _rkd_distance_bwd_kernel(
    x_ptr,  # [N, Dx] features of the side whose gradient is computed ("self")
    y_ptr,  # [N, Dy] features of the other side
    x_mean_ptr,  # [Dx] fp32 column mean of x
    y_mean_ptr,  # [Dy] fp32 column mean of y
    x_keys_ptr,  # [N] int64 row keys of x
    y_keys_ptr,  # [N] int64 row keys of y
    mu_ptr,  # [2] fp32 (mu_self, mu_other)
    c_ptr,  # [1] fp32 c of the self side (pass B1, sign included)
    grad_ptr,  # upstream grad: 0-dim, or [N, N] when GRAD_IS_MATRIX
    stride_g0,  # grad row stride
    stride_g1,  # grad column stride
    grad_scale,  # 1/N^2 for "mean", else 1
    dx_ptr,  # [N, Dx] fp32 contiguous, zero-initialised: dLoss/dx accumulated with atomics
    N,  # rows
    Dx,  # width of x
    Dy,  # width of y
    stride_xn,  # x row stride
    stride_xd,  # x column stride
    stride_yn,  # y row stride
    stride_yd,  # y column stride
    SIGN: tl.constexpr,  # +1.0: x is the student (h(d^x - d^y)); -1.0: x is the teacher
    GRAD_IS_MATRIX: tl.constexpr,  # reduction="none"
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # D chunk (Gram K-loop and dX update)
    CLAMP: tl.constexpr,  # squared-distance clamp (1e-12)
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_i = offs_i < N
    in_j = offs_j < N
    in_b = in_i[:, None] & in_j[None, :]
    dh_x, dh_y, e_x, distinct_x = _normalised_dists(
        x_ptr, y_ptr, x_mean_ptr, y_mean_ptr, x_keys_ptr, y_keys_ptr, mu_ptr, N, Dx, Dy,
        stride_xn, stride_xd, stride_yn, stride_yd, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, CLAMP,
    )  # fmt: skip
    g_ij, g_ji = _upstream_pair_grad(grad_ptr, stride_g0, stride_g1, grad_scale, offs_i, offs_j, in_b, GRAD_IS_MATRIX)
    # h' is symmetric in (i, j), so w_ij + w_ji = (sign h' (G_ij + G_ji) - 2c) / mu
    hp = tl.minimum(tl.maximum(SIGN * (dh_x - dh_y), -1.0), 1.0)
    w_sum = (SIGN * hp * (g_ij + g_ji) - 2.0 * tl.load(c_ptr)) / tl.load(mu_ptr)
    live = in_b & distinct_x & (e_x >= CLAMP)
    a = tl.where(live, w_sum / _clamped_dist(e_x, CLAMP), 0.0)
    rowsum = tl.sum(a, axis=1)
    row_i = offs_i.to(tl.int64) * stride_xn
    row_j = offs_j.to(tl.int64) * stride_xn
    out_i = offs_i.to(tl.int64) * Dx
    for k0 in range(0, Dx, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < Dx
        col = offs_k.to(tl.int64) * stride_xd
        mu = tl.load(x_mean_ptr + offs_k, mask=in_k, other=0.0)
        m_i = in_i[:, None] & in_k[None, :]
        m_j = in_j[:, None] & in_k[None, :]
        xi = tl.load(x_ptr + row_i[:, None] + col[None, :], mask=m_i, other=0.0).to(tl.float32)
        xj = tl.load(x_ptr + row_j[:, None] + col[None, :], mask=m_j, other=0.0).to(tl.float32)
        xi = tl.where(m_i, xi - mu[None, :], 0.0)
        xj = tl.where(m_j, xj - mu[None, :], 0.0)
        upd = rowsum[:, None] * xi - tl.dot(a, xj, input_precision="ieee")
        tl.atomic_add(dx_ptr + out_i[:, None] + offs_k[None, :], upd, mask=m_i)


# ---------------------------------------------------------------------------------------------
# RKD angle
# ---------------------------------------------------------------------------------------------
# E buffer (_rkd_sqdist_kernel): E_ij of the centred rows for distinct rows, -1 for identical
# rows and the diagonal (a sentinel: "difference vector exactly zero"), and also -1 where E_ij
# <= 8 ulp(fp32) (|x_i|^2 + |x_j|^2): below the Gram route's rounding the difference is
# unresolved (psi there would be noise of any size, e.g. 1e5), so it is treated as zero, as in
# torch_impl.rkd.  For anchor a, with e+ = max(E, 0):
#   C_a[b,c] = <x_b - x_a, x_c - x_a> = (e+_ab + e+_ac - e+_bc) / 2
#   v_ab     = 1 / max(sqrt(E_ab), 1e-12) if E_ab >= 0 else 0   (F.normalize, eps 1e-12; a zero
#              difference vector normalises to 0)
#   psi_abc  = C_a[b,c] v_ab v_ac, clamped to [-1, 1] (Cauchy-Schwarz; no gradient where clamped)
# loss = mean over all N^3 triples of h(psi^s - psi^t) ("none": [N] mean over (b, c) per a).
@triton.jit
def _rkd_sqdist_kernel(
    x_ptr,  # [N, D] features
    mean_ptr,  # [D] fp32 column mean of x
    keys_ptr,  # [N] int64 row keys of x
    sq_ptr,  # [N] fp32 |x_i - mean|^2
    e_ptr,  # [N, N] fp32 out: E_ij (distinct rows) or -1 (identical or unresolved rows, diagonal)
    N,  # rows
    D,  # width
    stride_n,  # row stride of x
    stride_d,  # column stride of x
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # D chunk
    FLOOR: tl.constexpr,  # rounding floor of E relative to |x_i|^2 + |x_j|^2 (8 ulp of fp32)
):
    offs_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    e, distinct = _centred_sqdist_tile(
        x_ptr, mean_ptr, keys_ptr, stride_n, stride_d, N, D, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K
    )
    mask = (offs_i[:, None] < N) & (offs_j[None, :] < N)
    sq_i = tl.load(sq_ptr + offs_i, mask=offs_i < N, other=0.0)
    sq_j = tl.load(sq_ptr + offs_j, mask=offs_j < N, other=0.0)
    resolved = distinct & (e > FLOOR * (sq_i[:, None] + sq_j[None, :]))
    tl.store(e_ptr + offs_i.to(tl.int64)[:, None] * N + offs_j[None, :], tl.where(resolved, e, -1.0), mask=mask)


@triton.jit
def _psi_tile(e_ab, e_ac, e_bc, EPS: tl.constexpr):
    # e_ab: [BLOCK_B] E[a, b]; e_ac: [BLOCK_C] E[a, c]; e_bc: [BLOCK_B, BLOCK_C] E[b, c]
    # (sentinel -1 for zero differences). Returns psi clamped to [-1, 1], v_ab [BLOCK_B],
    # v_ac [BLOCK_C], and the mask where the clamp passes a gradient.
    v_b = tl.where(e_ab >= 0.0, 1.0 / tl.maximum(tl.sqrt_rn(tl.maximum(e_ab, 0.0)), EPS), 0.0)
    v_c = tl.where(e_ac >= 0.0, 1.0 / tl.maximum(tl.sqrt_rn(tl.maximum(e_ac, 0.0)), EPS), 0.0)
    c = 0.5 * (tl.maximum(e_ab, 0.0)[:, None] + tl.maximum(e_ac, 0.0)[None, :] - tl.maximum(e_bc, 0.0))
    psi = c * v_b[:, None] * v_c[None, :]
    return tl.minimum(tl.maximum(psi, -1.0), 1.0), v_b, v_c, tl.abs(psi) <= 1.0


@triton.jit
def _rkd_angle_fwd_kernel(
    es_ptr,  # [N, N] fp32 E of the student (with the -1 sentinel)
    et_ptr,  # [N, N] fp32 E of the teacher (with the -1 sentinel)
    partial_ptr,  # [N, num_b_tiles] fp32 out: sum over (b in the tile, all c) of h for anchor a
    N,  # rows
    BLOCK_B: tl.constexpr,  # b tile
    BLOCK_C: tl.constexpr,  # c tile (inner loop)
    EPS: tl.constexpr,  # F.normalize eps (1e-12)
):
    a = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    in_b = offs_b < N
    row_a = a.to(tl.int64) * N
    row_b = offs_b.to(tl.int64) * N
    # out-of-bounds rows load the sentinel, so v = 0, psi = 0 and h = 0 there: no extra mask
    es_ab = tl.load(es_ptr + row_a + offs_b, mask=in_b, other=-1.0)
    et_ab = tl.load(et_ptr + row_a + offs_b, mask=in_b, other=-1.0)
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, N, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        in_c = offs_c < N
        m = in_b[:, None] & in_c[None, :]
        es_ac = tl.load(es_ptr + row_a + offs_c, mask=in_c, other=-1.0)
        et_ac = tl.load(et_ptr + row_a + offs_c, mask=in_c, other=-1.0)
        es_bc = tl.load(es_ptr + row_b[:, None] + offs_c[None, :], mask=m, other=0.0)
        et_bc = tl.load(et_ptr + row_b[:, None] + offs_c[None, :], mask=m, other=0.0)
        psi_s, _, _, _ = _psi_tile(es_ab, es_ac, es_bc, EPS)
        psi_t, _, _, _ = _psi_tile(et_ab, et_ac, et_bc, EPS)
        acc += _smooth_l1(psi_s - psi_t)
    tl.store(partial_ptr + a.to(tl.int64) * tl.num_programs(1) + pid_b, tl.sum(tl.sum(acc, axis=1), axis=0))


# Backward through E (the Laplacian form; equivalent to LOSSES.md §2.3's Gram identity).
# With w_a = dLoss/dh_abc (grad/N^3, grad, or grad[a]/N^2) and sign = +1 (student) / -1
# (teacher):  U_abc = sign w_a h'(psi^s_abc - psi^t_abc),  P_a[b,c] = U_abc v_ab v_ac.
# Z = dLoss/dE, treating each E_ij as its own variable; where |x_b - x_a| >= 1e-12,
#   dpsi_abc/dE_bc = -v_ab v_ac / 2,  dpsi_abc/dE_ab = v_ab v_ac / 2 - psi_abc / (2 E_ab)
# (below the eps, v is the constant 1e12: no norm path; at a zero difference v = 0: nothing), so
#   Z[b, c] += -1/2 P_a[b, c]                              (summed over the anchors a)
#   Z[a, b] += sum_c P_a[b, c] - q_ab sum_c U_abc psi_abc,  q_ab = v_ab^2 if E_ab >= 1e-24 else 0
#   (the b and c roles give equal terms because U_a and psi_a are symmetric in (b, c));
# then S = Z + Z^T and dX = 2 (diag(S 1) - S) X  (dE_ij/dx_i = 2 (x_i - x_j)): one GEMM in torch.
# Grid: (b tiles, c tiles, anchor splits); each program loops over its anchors, keeps its
# Z[b, c] tile in registers and adds the rows Z[a, b-tile] with atomics (N^3 / BLOCK_C adds).
@triton.jit
def _angle_side_update(zrow_ptrs, zacc, u, psi, v_b, v_c, e_ab, in_b, EPS: tl.constexpr):
    # One side's contribution for one anchor (see the block above); returns the new Z tile.
    p = u * v_b[:, None] * v_c[None, :]
    q = tl.where(e_ab >= EPS * EPS, v_b * v_b, 0.0)
    row = tl.sum(p, axis=1) - q * tl.sum(u * psi, axis=1)
    tl.atomic_add(zrow_ptrs, row, mask=in_b)
    return zacc - 0.5 * p


@triton.jit
def _rkd_angle_bwd_kernel(
    es_ptr,  # [N, N] fp32 E of the student (with the -1 sentinel)
    et_ptr,  # [N, N] fp32 E of the teacher (with the -1 sentinel)
    w_ptr,  # [N] fp32 per-anchor weight w_a = dLoss/dh_abc
    zs_ptr,  # [N, N] fp32 zero-initialised out: Z of the student (unused unless NEED_S)
    zt_ptr,  # [N, N] fp32 zero-initialised out: Z of the teacher (unused unless NEED_T)
    N,  # rows
    anchors_per_program,  # anchors handled by one program along grid axis 2
    NEED_S: tl.constexpr,  # accumulate the student's Z
    NEED_T: tl.constexpr,  # accumulate the teacher's Z
    BLOCK_B: tl.constexpr,  # b tile
    BLOCK_C: tl.constexpr,  # c tile
    EPS: tl.constexpr,  # F.normalize eps (1e-12)
):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    a_start = tl.program_id(2) * anchors_per_program
    a_end = tl.minimum(a_start + anchors_per_program, N)
    in_b = offs_b < N
    in_c = offs_c < N
    m = in_b[:, None] & in_c[None, :]
    pair = offs_b.to(tl.int64)[:, None] * N + offs_c[None, :]
    es_bc = tl.load(es_ptr + pair, mask=m, other=0.0)
    et_bc = tl.load(et_ptr + pair, mask=m, other=0.0)
    zs = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    zt = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for a in range(a_start, a_end):
        row_a = tl.cast(a, tl.int64) * N
        es_ab = tl.load(es_ptr + row_a + offs_b, mask=in_b, other=-1.0)
        et_ab = tl.load(et_ptr + row_a + offs_b, mask=in_b, other=-1.0)
        es_ac = tl.load(es_ptr + row_a + offs_c, mask=in_c, other=-1.0)
        et_ac = tl.load(et_ptr + row_a + offs_c, mask=in_c, other=-1.0)
        psi_s, vs_b, vs_c, live_s = _psi_tile(es_ab, es_ac, es_bc, EPS)
        psi_t, vt_b, vt_c, live_t = _psi_tile(et_ab, et_ac, et_bc, EPS)
        u = tl.load(w_ptr + a) * tl.minimum(tl.maximum(psi_s - psi_t, -1.0), 1.0)
        if NEED_S:
            zs = _angle_side_update(
                zs_ptr + row_a + offs_b, zs, tl.where(live_s, u, 0.0), psi_s, vs_b, vs_c, es_ab, in_b, EPS
            )
        if NEED_T:
            zt = _angle_side_update(
                zt_ptr + row_a + offs_b, zt, tl.where(live_t, -u, 0.0), psi_t, vt_b, vt_c, et_ab, in_b, EPS
            )
    if NEED_S:
        tl.atomic_add(zs_ptr + pair, zs, mask=m)
    if NEED_T:
        tl.atomic_add(zt_ptr + pair, zt, mask=m)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
_TILE_KW = {"BLOCK_M": _BLOCK_PAIR, "BLOCK_N": _BLOCK_PAIR, "BLOCK_K": _BLOCK_K, "num_warps": _WARPS_DIST}


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _side(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 column mean [D], int64 row keys [N]) of one input."""
    keys = row_keys(x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32))
    return x.mean(dim=0, dtype=torch.float32), keys


def _pair_grid(n: int) -> tuple[int, int]:
    t = triton.cdiv(n, _BLOCK_PAIR)
    return (t, t)


def _pair_args(x: torch.Tensor, y: torch.Tensor, x_side: tuple, y_side: tuple) -> tuple[tuple, tuple]:
    """Pointer arguments (x, y, means, keys) and size arguments (N, widths, strides) of the
    distance kernels, x first."""
    ptrs = (x, y, x_side[0], y_side[0], x_side[1], y_side[1])
    sizes = (x.shape[0], x.shape[1], y.shape[1], x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    return ptrs, sizes


def rkd_distance_fwd_triton(
    student: torch.Tensor, teacher: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RKD distance loss forward with Triton kernels (two passes over pair tiles).

    Args:
        student: ``[N, Ds]`` features (fp32, fp16, bf16; float64 is computed in fp32).
        teacher: ``[N, Dt]`` features on the same device.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (``[N, N]`` per-pair smooth-L1 terms).

    Returns:
        ``(loss, mu_s, mu_t)``: the loss in the student's dtype, and the 0-dim mean
        off-diagonal distances of student and teacher (saved for the backward) in
        ``torch_impl.rkd.compute_dtype`` (float32, or float64 when an input is float64).
    """
    _check_reduction(reduction)
    n = student.shape[0]
    ptrs, sizes = _pair_args(student, teacher, _side(student), _side(teacher))
    grid = _pair_grid(n)
    partial = torch.empty(grid[0] * grid[1], 2, device=student.device, dtype=torch.float32)
    _rkd_distance_mean_kernel[grid](*ptrs, partial, *sizes, CLAMP=_CLAMP, **_TILE_KW)
    # N = 1: 0/0 = NaN, as the reference's empty mean; two separate sums, so the returned
    # means do not alias each other (custom ops may not return aliased outputs)
    mu_s, mu_t = (partial[:, k].sum() / float(n * (n - 1)) for k in range(2))
    mu = torch.stack([mu_s, mu_t])
    if reduction == "none":
        out = torch.empty(n, n, device=student.device, dtype=student.dtype)
    else:
        out = torch.empty(grid[0] * grid[1], device=student.device, dtype=torch.float32)
    _rkd_distance_fwd_kernel[grid](*ptrs, mu, out, *sizes, REDUCE_NONE=reduction == "none", CLAMP=_CLAMP, **_TILE_KW)
    if reduction == "none":
        loss = out
    else:
        loss = (out.sum() / float(n * n) if reduction == "mean" else out.sum()).to(student.dtype)
    dtype = compute_dtype(student, teacher)
    return loss, mu_s.to(dtype), mu_t.to(dtype)


def rkd_distance_bwd_triton(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    mu_s: torch.Tensor,
    mu_t: torch.Tensor,
    reduction: str,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RKD distance loss backward with Triton kernels (a statistics pass, then dX per side).

    Args:
        grad: upstream gradient, 0-dim for ``"mean"``/``"sum"``, ``[N, N]`` for ``"none"``.
        student, teacher: the forward's inputs.
        mu_s, mu_t: the 0-dim mean distances returned by :func:`rkd_distance_fwd_triton`.
        reduction: as in the forward.
        need_student, need_teacher: which gradients to compute.

    Returns:
        ``(grad_student, grad_teacher)`` in each input's dtype, ``None`` where not needed.
        The student's gradient includes the path through ``mu_s``; the teacher's is its true
        gradient (through ``mu_t``). Pairs at the 1e-12 clamp (identical rows) get none.
    """
    _check_reduction(reduction)
    if not (need_student or need_teacher):
        return None, None
    n = student.shape[0]
    s_side, t_side = _side(student), _side(teacher)
    mu = torch.stack([mu_s, mu_t]).to(torch.float32)
    if reduction == "none":
        gargs, is_matrix = (grad, grad.stride(0), grad.stride(1), 1.0), True
    else:
        gargs, is_matrix = (grad, 0, 0, 1.0 / (n * n) if reduction == "mean" else 1.0), False
    grid = _pair_grid(n)
    partial = torch.empty(grid[0] * grid[1], 2, device=student.device, dtype=torch.float32)
    ptrs, sizes = _pair_args(student, teacher, s_side, t_side)
    _rkd_distance_bwd_stats_kernel[grid](
        *ptrs, mu, *gargs, partial, *sizes, GRAD_IS_MATRIX=is_matrix, CLAMP=_CLAMP, **_TILE_KW
    )
    # c_s = (1/M) sum g d^s; the teacher's g has the opposite sign, so c_t = -(1/M) sum g d^t
    # (negated on the device: a torch.tensor([1, -1], device=...) factor is a blocking host copy)
    c = partial.sum(dim=0) / float(n * (n - 1))
    c = torch.stack((c[0], -c[1]))

    def side_grad(x, y, x_side, y_side, mu_xy, c_x, sign):
        dx = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        ptrs, sizes = _pair_args(x, y, x_side, y_side)
        _rkd_distance_bwd_kernel[grid](
            *ptrs, mu_xy, c_x, *gargs, dx, *sizes, SIGN=sign, GRAD_IS_MATRIX=is_matrix, CLAMP=_CLAMP, **_TILE_KW
        )
        return dx.to(x.dtype)

    grad_s = side_grad(student, teacher, s_side, t_side, mu, c[0:1], 1.0) if need_student else None
    grad_t = side_grad(teacher, student, t_side, s_side, mu.flip(0), c[1:2], -1.0) if need_teacher else None
    return grad_s, grad_t


def _angle_e(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [N, N] fp32 E buffers (with the -1 sentinel) of student and teacher."""
    n = student.shape[0]
    out = []
    for x in (student, teacher):
        mean, keys = _side(x)
        sq = (x.to(torch.float32) - mean).square().sum(dim=1)
        e = torch.empty(n, n, device=x.device, dtype=torch.float32)
        _rkd_sqdist_kernel[_pair_grid(n)](
            x, mean, keys, sq, e, n, x.shape[1], x.stride(0), x.stride(1), FLOOR=_GRAM_FLOOR, **_TILE_KW
        )
        out.append(e)
    return out[0], out[1]


def rkd_angle_fwd_triton(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> torch.Tensor:
    """RKD angle loss forward with Triton kernels (E buffers, then the tiled N^3 triple loop).

    Args:
        student: ``[N, Ds]`` features (fp32, fp16, bf16; float64 is computed in fp32).
        teacher: ``[N, Dt]`` features on the same device.
        reduction: ``"mean"`` (over all N^3 triples) | ``"sum"`` | ``"none"`` (``[N]``: for
            each anchor a, the mean over its N^2 (b, c) pairs).

    Returns:
        The loss in the student's dtype.
    """
    _check_reduction(reduction)
    n = student.shape[0]
    es, et = _angle_e(student, teacher)
    nb = triton.cdiv(n, _BLOCK_PAIR)
    partial = torch.empty(n, nb, device=student.device, dtype=torch.float32)
    _rkd_angle_fwd_kernel[(n, nb)](
        es, et, partial, n, BLOCK_B=_BLOCK_PAIR, BLOCK_C=_BLOCK_PAIR, EPS=_CLAMP, num_warps=_WARPS_ANGLE
    )
    if reduction == "none":
        loss = partial.sum(dim=1) / float(n * n)
    elif reduction == "mean":
        loss = partial.sum() / float(n) ** 3
    else:
        loss = partial.sum()
    return loss.to(student.dtype)


def rkd_angle_bwd_triton(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    reduction: str,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RKD angle loss backward with Triton kernels: dLoss/dE per side, then one GEMM each.

    Args:
        grad: upstream gradient, 0-dim for ``"mean"``/``"sum"``, ``[N]`` for ``"none"``.
        student, teacher: the forward's inputs.
        reduction: as in the forward.
        need_student, need_teacher: which gradients to compute.

    Returns:
        ``(grad_student, grad_teacher)`` in each input's dtype (contiguous), ``None`` where
        not needed. Pairs of identical rows get zero gradient (see the module docstring).
    """
    _check_reduction(reduction)
    if not (need_student or need_teacher):
        return None, None
    n = student.shape[0]
    es, et = _angle_e(student, teacher)
    g = grad.to(torch.float32)
    if reduction == "none":
        w = g / float(n * n)
    else:
        w = (g / float(n) ** 3 if reduction == "mean" else g).expand(n)
    w = w.contiguous()
    zs = torch.zeros(n, n, device=student.device, dtype=torch.float32) if need_student else es
    zt = torch.zeros(n, n, device=student.device, dtype=torch.float32) if need_teacher else et
    nb = triton.cdiv(n, _BLOCK_PAIR)
    splits = 1 if TRITON_INTERPRET else max(1, min(n, triton.cdiv(_TARGET_PROGRAMS, nb * nb)))
    per = triton.cdiv(n, splits)
    _rkd_angle_bwd_kernel[(nb, nb, triton.cdiv(n, per))](
        es, et, w, zs, zt, n, per, NEED_S=need_student, NEED_T=need_teacher,
        BLOCK_B=_BLOCK_PAIR, BLOCK_C=_BLOCK_PAIR, EPS=_CLAMP, num_warps=_WARPS_ANGLE,
    )  # fmt: skip

    def to_grad(x, z):
        xc = x.to(torch.float32) - x.mean(dim=0, dtype=torch.float32)
        s = z + z.T
        return (2.0 * (s.sum(dim=1, keepdim=True) * xc - s @ xc)).to(x.dtype).contiguous()

    grad_s = to_grad(student, zs) if need_student else None
    grad_t = to_grad(teacher, zt) if need_teacher else None
    return grad_s, grad_t
