"""Triton kernels of the RKD angle loss (forward and backward); math in docs/rkd.md.

Passes. (1) ``_rkd_angle_e_kernel`` per network: the [N, N] fp32 squared distances E of the
centred rows on tensor-core Gram tiles, explicit for near pairs (docs/rkd.md section 4), and
per-anchor int32 near flags (relaxed ``atomic_max``; shared by both networks, so a near anchor
is near in the student OR the teacher). (2) The E route for every other anchor: the tiled N^3
triple loop over the two E buffers (forward: grid (anchor, b tile) looping over c tiles;
backward: grid (b tile, c tile, anchor split) looping over anchors, accumulating dLoss/dE per
side with relaxed atomics, then one GEMM in torch). (3) The explicit route for near anchors
(rare): difference vectors v_b = x_b - x_a of the original rows in fp32, psi tiles from
tensor-core dots of them; the backward is the v-form of docs/rkd.md. Every program of the
explicit kernels whose anchor is not near exits at once; the E-route kernels skip near
anchors. Memory: two [N, N] fp32 E buffers (plus one [N, N] dLoss/dE per needed gradient in
the backward), per-program partial sums, no N x N x D or N^3 buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kd_kernels._backend import TRITON_INTERPRET
from kd_kernels.triton._tiles import clamp1, dot_precision, nan_carrier, policy_dot, smooth_l1, sqdist_near
from kd_kernels.triton.rkd_distance import TAU, check_inputs, pick_pair_config

__all__ = ["ANGLE_CONFIGS", "pick_angle_config", "rkd_angle_bwd_triton", "rkd_angle_fwd_triton"]

# F.normalize's eps on norms of difference vectors
_EPS = 1e-12

# Launch configurations of the triple kernels (the E buffer uses the distance table).
# "e_route": 64x32 (b, c) tiles of elementwise fp32 work on E loads, 8 warps, no dot, so no
# pipelining (1 stage). 64x64 tiles hit the 255-register cap and spilled 52 B (fp32, sm_80,
# odd shape).
# "explicit": the near-anchor kernels (rare) hold two psi accumulators, U and the g chunk, all
# from 3xTF32 dots of fp32 difference tiles (hi/lo splits in registers): 32x32 tiles with a
# 32-column D chunk, 8 warps, 1 stage (the tiles are built in registers: no cp.async). At 4
# warps they hit the 255-register cap and spilled 140-316 B at the odd shape.
# maxnreg=255 on both: at 8 warps ptxas's occupancy heuristic otherwise holds them at 80-128
# registers and spills 4-80 B. With it (compile gate, sm_80/sm_90): E-route kernels 72-162
# registers, explicit backward 112-250 (one 8-warp program per SM there: the rare path).
# "interpret": 32-wide tiles (cheap to interpret; N = 40 spans two tiles).
# TARGET_PROGRAMS: the E-route backward splits anchors over grid axis 2 until about this many
# programs exist (several waves on a 132-SM GPU); the interpreter takes one split.
ANGLE_CONFIGS = {
    "e_route": dict(BLOCK_B=64, BLOCK_C=32, num_warps=8, num_stages=1, maxnreg=255),
    "explicit": dict(BLOCK_B=32, BLOCK_C=32, BLOCK_K=32, num_warps=8, num_stages=1, maxnreg=255),
    "interpret_e_route": dict(BLOCK_B=32, BLOCK_C=32, num_warps=4, num_stages=1),
    "interpret_explicit": dict(BLOCK_B=32, BLOCK_C=32, BLOCK_K=32, num_warps=4, num_stages=1),
}
TARGET_PROGRAMS = 1024

# Compile-gate spill allowances (bytes of spill stores + loads per thread), each with its why:
# none (every configuration above compiles without spills on sm_80 and sm_90).
GATE_SPILL_ALLOWANCE: dict[str, tuple[int, str]] = {}


def pick_angle_config(kind: str) -> dict:
    """The ANGLE_CONFIGS entry of a triple kernel: ``kind`` is "e_route" or "explicit"."""
    return ANGLE_CONFIGS[("interpret_" if TRITON_INTERPRET else "") + kind]


# E buffer (docs/rkd.md sections 1, 4): E_ij from sqdist_near (explicit for near pairs),
# E_ii = 0; flag[i] = max(flag[i], any_j near_ij).
@triton.jit
def _rkd_angle_e_kernel(
    x_ptr,  # [N, D] features
    mean_ptr,  # [D] fp32 column mean of x
    e_ptr,  # [N, N] fp32 out: E
    flag_ptr,  # [N] int32, zero-initialised, shared by both networks: 1 for a near anchor
    N,  # rows
    D,  # width
    stride_n,  # row stride of x
    stride_d,  # column stride of x
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    BLOCK_K: tl.constexpr,  # D chunk
    PREC: tl.constexpr,  # fp32 dot precision
    TAU: tl.constexpr,  # near threshold (2^-6)
):
    offs_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    e, near = sqdist_near(x_ptr, mean_ptr, stride_n, stride_d, N, D, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, PREC, TAU)
    in_i = offs_i < N
    mask = in_i[:, None] & (offs_j[None, :] < N)
    e = tl.where(offs_i[:, None] == offs_j[None, :], 0.0, e)
    tl.store(e_ptr + offs_i.to(tl.int64)[:, None] * N + offs_j[None, :], e, mask=mask)
    # near is symmetric and both (i, j) and (j, i) tiles run: the row flags cover every anchor
    tl.atomic_max(flag_ptr + offs_i, tl.max(near.to(tl.int32), axis=1), mask=in_i, sem="relaxed")


# E route (non-near anchors a; docs/rkd.md sections 3, 4). With v_ab = 1/max(sqrt(E_ab), 1e-12)
# for E_ab > 0 and 0 for E_ab = 0 (b = a: F.normalize of a zero vector):
#   psi_abc = (E_ab + E_ac - E_bc) / 2 * v_ab v_ac
#   loss = sum over triples of h(psi^s - psi^t): "mean" / N^3, "sum", "none": [N] per-anchor / N^2
@triton.jit
def _psi_e(e_ab, e_ac, e_bc, EPS: tl.constexpr):
    # e_ab [BB], e_ac [BC], e_bc [BB, BC] -> (psi [BB, BC], v_ab [BB], v_ac [BC])
    v_b = tl.where(e_ab > 0.0, 1.0 / tl.maximum(tl.sqrt_rn(e_ab), EPS), 0.0)
    v_c = tl.where(e_ac > 0.0, 1.0 / tl.maximum(tl.sqrt_rn(e_ac), EPS), 0.0)
    psi = 0.5 * (e_ab[:, None] + e_ac[None, :] - e_bc) * v_b[:, None] * v_c[None, :]
    return psi, v_b, v_c


@triton.jit
def _rkd_angle_fwd_kernel(
    es_ptr,  # [N, N] fp32 E of the student
    et_ptr,  # [N, N] fp32 E of the teacher
    flag_ptr,  # [N] int32 near-anchor flags (skipped here)
    partial_ptr,  # [N, num_b_tiles] fp32 out: sum over (b in the tile, all c) of h for anchor a
    N,  # rows
    BLOCK_B: tl.constexpr,  # b tile
    BLOCK_C: tl.constexpr,  # c tile (inner loop)
    EPS: tl.constexpr,  # F.normalize eps (1e-12)
):
    a = tl.program_id(0)
    pid_b = tl.program_id(1)
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    if tl.load(flag_ptr + a) == 0:
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        in_b = offs_b < N
        row_a = a.to(tl.int64) * N
        row_b = offs_b.to(tl.int64) * N
        # out-of-bounds rows load E = 0, so v = 0 and psi = 0 there: no extra mask
        es_ab = tl.load(es_ptr + row_a + offs_b, mask=in_b, other=0.0)
        et_ab = tl.load(et_ptr + row_a + offs_b, mask=in_b, other=0.0)
        for c0 in range(0, N, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            in_c = offs_c < N
            m = in_b[:, None] & in_c[None, :]
            es_ac = tl.load(es_ptr + row_a + offs_c, mask=in_c, other=0.0)
            et_ac = tl.load(et_ptr + row_a + offs_c, mask=in_c, other=0.0)
            es_bc = tl.load(es_ptr + row_b[:, None] + offs_c[None, :], mask=m, other=0.0)
            et_bc = tl.load(et_ptr + row_b[:, None] + offs_c[None, :], mask=m, other=0.0)
            psi_s, _, _ = _psi_e(es_ab, es_ac, es_bc, EPS)
            psi_t, _, _ = _psi_e(et_ab, et_ac, et_bc, EPS)
            acc += smooth_l1(psi_s - psi_t)
    tl.store(partial_ptr + a.to(tl.int64) * tl.num_programs(1) + pid_b, tl.sum(acc))


# E-route backward (the Laplacian form). w_a = dLoss/dh_abc (grad/N^3, grad, or grad[a]/N^2),
# sign = +1 (student) / -1 (teacher):  U_abc = sign w_a h'(psi^s_abc - psi^t_abc),
# P_a[b, c] = U_abc v_ab v_ac.  Z = dLoss/dE, each E_ij its own variable:
#   dpsi_abc/dE_bc = -v_ab v_ac / 2,  dpsi_abc/dE_ab = v_ab v_ac / 2 - psi_abc / (2 E_ab), so
#   Z[b, c] += -1/2 P_a[b, c]                               (summed over the anchors a)
#   Z[a, b] += sum_c P_a[b, c] - v_ab^2 sum_c U_abc psi_abc  (b and c roles are equal: U_a and
#              psi_a are symmetric in (b, c))
# then S = Z + Z^T and dX = 2 (diag(S 1) - S) x~   (dE_ij/dx_i = 2 (x_i - x_j)): one GEMM in torch.
@triton.jit
def _e_side_update(zrow_ptrs, zacc, u, psi, v_b, v_c, in_b):
    # one side's contribution of one anchor (see above); returns the new Z[b, c] tile
    p = u * v_b[:, None] * v_c[None, :]
    row = tl.sum(p, axis=1) - v_b * v_b * tl.sum(u * psi, axis=1)
    tl.atomic_add(zrow_ptrs, row, mask=in_b, sem="relaxed")
    return zacc - 0.5 * p


@triton.jit
def _rkd_angle_bwd_kernel(
    es_ptr,  # [N, N] fp32 E of the student
    et_ptr,  # [N, N] fp32 E of the teacher
    flag_ptr,  # [N] int32 near-anchor flags (skipped here)
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
        if tl.load(flag_ptr + a) == 0:
            row_a = tl.cast(a, tl.int64) * N
            es_ab = tl.load(es_ptr + row_a + offs_b, mask=in_b, other=0.0)
            et_ab = tl.load(et_ptr + row_a + offs_b, mask=in_b, other=0.0)
            es_ac = tl.load(es_ptr + row_a + offs_c, mask=in_c, other=0.0)
            et_ac = tl.load(et_ptr + row_a + offs_c, mask=in_c, other=0.0)
            psi_s, vs_b, vs_c = _psi_e(es_ab, es_ac, es_bc, EPS)
            psi_t, vt_b, vt_c = _psi_e(et_ab, et_ac, et_bc, EPS)
            u = tl.load(w_ptr + a) * clamp1(psi_s - psi_t)
            if NEED_S:
                zs = _e_side_update(zs_ptr + row_a + offs_b, zs, u, psi_s, vs_b, vs_c, in_b)
            if NEED_T:
                zt = _e_side_update(zt_ptr + row_a + offs_b, zt, -u, psi_t, vt_b, vt_c, in_b)
    if NEED_S:
        tl.atomic_add(zs_ptr + pair, zs, mask=m, sem="relaxed")
    if NEED_T:
        tl.atomic_add(zt_ptr + pair, zt, mask=m, sem="relaxed")


# Explicit route (near anchors; docs/rkd.md section 4), upstream's formula:
#   v_b = x_b - x_a (original rows, fp32),  n_b = |v_b|,  v^_b = v_b / max(n_b, 1e-12)
#   psi_abc = v^_b . v^_c = (v_b . v_c) / (max(n_b, eps) max(n_c, eps))   (one dot over D per
#   (b, c) tile; identical rows give v = 0, psi = 0)
@triton.jit
def _explicit_psi(
    x_ptr, a, offs_b, offs_c, N, D, stride_n, stride_d,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    # (psi [BB, BC], 1/max(n_b, eps) [BB], 1/max(n_c, eps) [BC], n_b [BB]) of one network
    in_b = offs_b < N
    in_c = offs_c < N
    row_a = tl.cast(a, tl.int64) * stride_n
    row_b = offs_b.to(tl.int64) * stride_n
    row_c = offs_c.to(tl.int64) * stride_n
    dotp = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    nb2 = tl.zeros([BLOCK_B], dtype=tl.float32)
    nc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < D
        col = offs_k.to(tl.int64) * stride_d
        xa = tl.load(x_ptr + row_a + col, mask=in_k, other=0.0).to(tl.float32)
        mb = in_b[:, None] & in_k[None, :]
        mc = in_c[:, None] & in_k[None, :]
        vb = tl.where(mb, tl.load(x_ptr + row_b[:, None] + col[None, :], mask=mb, other=0.0).to(tl.float32) - xa, 0.0)
        vc = tl.where(mc, tl.load(x_ptr + row_c[:, None] + col[None, :], mask=mc, other=0.0).to(tl.float32) - xa, 0.0)
        # fp32 difference tiles: the fp32 rule of the policy (tf32x3 / tf32; ieee interpreted)
        dotp = policy_dot(vb, tl.trans(vc), dotp, PREC)
        nb2 += tl.sum(vb * vb, axis=1)
        nc2 += tl.sum(vc * vc, axis=1)
    nb = tl.sqrt_rn(nb2)
    rb = 1.0 / tl.maximum(nb, EPS)
    rc = 1.0 / tl.maximum(tl.sqrt_rn(nc2), EPS)
    return dotp * rb[:, None] * rc[None, :], rb, rc, nb


@triton.jit
def _rkd_angle_fwd_explicit_kernel(
    s_ptr,  # [N, Ds] student features
    t_ptr,  # [N, Dt] teacher features
    flag_ptr,  # [N] int32 near-anchor flags (only flagged anchors run)
    partial_ptr,  # [N, num_b_tiles] fp32, zero-initialised: near anchors' sums of h per b tile
    N,  # rows
    Ds,  # student width
    Dt,  # teacher width
    stride_sn,  # student row stride
    stride_sd,  # student column stride
    stride_tn,  # teacher row stride
    stride_td,  # teacher column stride
    BLOCK_B: tl.constexpr,  # b tile
    BLOCK_C: tl.constexpr,  # c tile
    BLOCK_K: tl.constexpr,  # D chunk
    PREC: tl.constexpr,  # fp32 dot precision
    EPS: tl.constexpr,  # F.normalize eps (1e-12)
):
    a = tl.program_id(0)
    pid_b = tl.program_id(1)
    if tl.load(flag_ptr + a) != 0:
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, N, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            psi_s, _, _, _ = _explicit_psi(
                s_ptr, a, offs_b, offs_c, N, Ds, stride_sn, stride_sd, BLOCK_B, BLOCK_C, BLOCK_K, PREC, EPS
            )
            psi_t, _, _, _ = _explicit_psi(
                t_ptr, a, offs_b, offs_c, N, Dt, stride_tn, stride_td, BLOCK_B, BLOCK_C, BLOCK_K, PREC, EPS
            )
            acc += smooth_l1(psi_s - psi_t)  # out-of-bounds b, c: v = 0, psi = 0, h = 0
        tl.store(partial_ptr + a.to(tl.int64) * tl.num_programs(1) + pid_b, tl.sum(acc))


# Explicit backward, the v-form (docs/rkd.md section 4), for side x (sign +1 student, -1 teacher):
#   U_bc = sign w_a h'(psi^s_abc - psi^t_abc)
#   g_b  = 2 sum_c U_bc v^_c ;   r_b = v^_b . g_b = 2 sum_c U_bc psi^x_bc   (no D needed)
#   dv_b = (g_b - v^_b r_b) / n_b  if n_b >= 1e-12, else 0
#   dx_b += dv_b,   dx_a -= sum_b dv_b
# The program (a, b tile) walks D chunks of x; for each chunk it recomputes the psi tiles of
# every c tile (both networks, over their full D) and accumulates g_b's chunk and r_b: rare
# path, correctness first.
@triton.jit
def _rkd_angle_bwd_explicit_kernel(
    x_ptr,  # [N, Dx] features of the side whose gradient is computed
    y_ptr,  # [N, Dy] features of the other side
    flag_ptr,  # [N] int32 near-anchor flags (only flagged anchors run)
    w_ptr,  # [N] fp32 per-anchor weight w_a
    dx_ptr,  # [N, Dx] fp32 contiguous: dLoss/dx, added to with relaxed atomics
    N,  # rows
    Dx,  # width of x
    Dy,  # width of y
    stride_xn,  # x row stride
    stride_xd,  # x column stride
    stride_yn,  # y row stride
    stride_yd,  # y column stride
    SIGN: tl.constexpr,  # +1.0: x is the student; -1.0: x is the teacher
    BLOCK_B: tl.constexpr,  # b tile
    BLOCK_C: tl.constexpr,  # c tile
    BLOCK_K: tl.constexpr,  # D chunk (psi dots and the dx chunk)
    PREC: tl.constexpr,  # fp32 dot precision
    EPS: tl.constexpr,  # F.normalize eps (1e-12)
):
    a = tl.program_id(0)
    if tl.load(flag_ptr + a) != 0:
        offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        in_b = offs_b < N
        row_a = tl.cast(a, tl.int64) * stride_xn
        w = tl.load(w_ptr + a) * SIGN
        for k0 in range(0, Dx, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < Dx
            col = offs_k.to(tl.int64) * stride_xd
            xa = tl.load(x_ptr + row_a + col, mask=in_k, other=0.0).to(tl.float32)
            g = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
            r = tl.zeros([BLOCK_B], dtype=tl.float32)
            rb = tl.zeros([BLOCK_B], dtype=tl.float32)
            nb = tl.zeros([BLOCK_B], dtype=tl.float32)
            for c0 in range(0, N, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                in_c = offs_c < N
                psi_x, rb, rc, nb = _explicit_psi(
                    x_ptr, a, offs_b, offs_c, N, Dx, stride_xn, stride_xd, BLOCK_B, BLOCK_C, BLOCK_K, PREC, EPS
                )
                psi_y, _, _, _ = _explicit_psi(
                    y_ptr, a, offs_b, offs_c, N, Dy, stride_yn, stride_yd, BLOCK_B, BLOCK_C, BLOCK_K, PREC, EPS
                )
                u = w * clamp1(SIGN * (psi_x - psi_y))
                r += 2.0 * tl.sum(u * psi_x, axis=1)
                mc = in_c[:, None] & in_k[None, :]
                xc = tl.load(x_ptr + offs_c.to(tl.int64)[:, None] * stride_xn + col[None, :], mask=mc, other=0.0)
                vhat_c = tl.where(mc, xc.to(tl.float32) - xa[None, :], 0.0) * rc[:, None]
                g = policy_dot(2.0 * u, vhat_c, g, PREC)
            mb = in_b[:, None] & in_k[None, :]
            xb = tl.load(x_ptr + offs_b.to(tl.int64)[:, None] * stride_xn + col[None, :], mask=mb, other=0.0)
            vhat_b = tl.where(mb, xb.to(tl.float32) - xa[None, :], 0.0) * rb[:, None]
            live = in_b & (nb >= EPS)
            dv = tl.where(live[:, None], (g - vhat_b * r[:, None]) / tl.maximum(nb, EPS)[:, None], 0.0)
            dx_k = offs_k.to(tl.int64)
            tl.atomic_add(dx_ptr + offs_b.to(tl.int64)[:, None] * Dx + dx_k[None, :], dv, mask=mb, sem="relaxed")
            tl.atomic_add(dx_ptr + tl.cast(a, tl.int64) * Dx + dx_k, -tl.sum(dv, axis=0), mask=in_k, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _angle_e(student: torch.Tensor, teacher: torch.Tensor, prec: str):
    """(E_s, E_t, near-anchor flags [N] int32) from the E kernel, one launch per network."""
    n = student.shape[0]
    cfg = pick_pair_config(student, teacher)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    flags = torch.zeros(n, device=student.device, dtype=torch.int32)
    out = []
    for x in (student, teacher):
        e = torch.empty(n, n, device=x.device, dtype=torch.float32)
        mean = x.mean(dim=0, dtype=torch.float32)
        _rkd_angle_e_kernel[grid](
            x, mean, e, flags, n, x.shape[1], x.stride(0), x.stride(1), PREC=prec, TAU=TAU, **cfg
        )
        out.append(e)
    return out[0], out[1], flags


def _xy_sizes(x: torch.Tensor, y: torch.Tensor) -> tuple:
    return (x.shape[0], x.shape[1], y.shape[1], x.stride(0), x.stride(1), y.stride(0), y.stride(1))


def rkd_angle_fwd_triton(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> torch.Tensor:
    """RKD angle loss forward: E buffers and flags, the E route, the explicit route.

    Args:
        student: ``[N, Ds]`` features (fp32, fp16 or bf16; float64 raises: it runs on the
            PyTorch path).
        teacher: ``[N, Dt]`` features on the same device.
        reduction: ``"mean"`` (over all N^3 triples) | ``"sum"`` | ``"none"`` (``[N]``: for
            each anchor, the mean over its N^2 (b, c) pairs).

    Returns:
        The loss in the student's dtype.
    """
    check_inputs(student, teacher, reduction)
    n = student.shape[0]
    prec = dot_precision()
    es, et, flags = _angle_e(student, teacher, prec)
    ecfg, xcfg = pick_angle_config("e_route"), pick_angle_config("explicit")
    nb = triton.cdiv(n, ecfg["BLOCK_B"])
    partial = torch.empty(n, nb, device=student.device, dtype=torch.float32)
    _rkd_angle_fwd_kernel[(n, nb)](es, et, flags, partial, n, EPS=_EPS, **ecfg)
    nbx = triton.cdiv(n, xcfg["BLOCK_B"])
    partial_x = torch.zeros(n, nbx, device=student.device, dtype=torch.float32)
    _rkd_angle_fwd_explicit_kernel[(n, nbx)](
        student, teacher, flags, partial_x, *_xy_sizes(student, teacher), PREC=prec, EPS=_EPS, **xcfg
    )
    per_anchor = partial.sum(dim=1) + partial_x.sum(dim=1)  # each anchor has one nonzero part
    per_anchor = per_anchor + nan_carrier(student, teacher)  # NaN for a non-finite input
    if reduction == "none":
        loss = per_anchor / float(n * n)
    elif reduction == "mean":
        loss = per_anchor.sum() / float(n) ** 3
    else:
        loss = per_anchor.sum()
    return loss.to(student.dtype)


def rkd_angle_bwd_triton(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    reduction: str,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RKD angle loss backward: dLoss/dE per side and one GEMM (E route), plus the explicit
    v-form kernels for near anchors.

    Args:
        grad: upstream gradient, 0-dim for ``"mean"``/``"sum"``, ``[N]`` for ``"none"``.
        student, teacher: the forward's inputs.
        reduction: as in the forward.
        need_student, need_teacher: which gradients to compute.

    Returns:
        ``(grad_student, grad_teacher)`` in each input's dtype (contiguous), ``None`` where not
        needed. Zero-length difference vectors (identical rows) contribute no gradient.
    """
    check_inputs(student, teacher, reduction)
    if not (need_student or need_teacher):
        return None, None
    n = student.shape[0]
    prec = dot_precision()
    es, et, flags = _angle_e(student, teacher, prec)
    g = grad.to(torch.float32)
    if reduction == "none":
        w = g / float(n * n)
    else:
        w = (g / float(n) ** 3 if reduction == "mean" else g).expand(n)
    w = w.contiguous()
    zs = torch.zeros(n, n, device=student.device, dtype=torch.float32) if need_student else es
    zt = torch.zeros(n, n, device=student.device, dtype=torch.float32) if need_teacher else et
    ecfg, xcfg = pick_angle_config("e_route"), pick_angle_config("explicit")
    nb = triton.cdiv(n, ecfg["BLOCK_B"])
    nc = triton.cdiv(n, ecfg["BLOCK_C"])
    splits = 1 if TRITON_INTERPRET else max(1, min(n, triton.cdiv(TARGET_PROGRAMS, nb * nc)))
    per = triton.cdiv(n, splits)
    _rkd_angle_bwd_kernel[(nb, nc, triton.cdiv(n, per))](
        es, et, flags, w, zs, zt, n, per, NEED_S=need_student, NEED_T=need_teacher, EPS=_EPS, **ecfg
    )

    def side_grad(x, y, z, sign):
        xc = x.to(torch.float32) - x.mean(dim=0, dtype=torch.float32)
        s = z + z.T
        dx = 2.0 * (s.sum(dim=1, keepdim=True) * xc - s @ xc)
        _rkd_angle_bwd_explicit_kernel[(n, triton.cdiv(n, xcfg["BLOCK_B"]))](
            x, y, flags, w, dx, *_xy_sizes(x, y), SIGN=sign, PREC=prec, EPS=_EPS, **xcfg
        )
        return (dx + carrier).to(x.dtype)

    carrier = nan_carrier(student, teacher)  # as in the forward: NaN for a non-finite input

    grad_s = side_grad(student, teacher, zs, 1.0) if need_student else None
    grad_t = side_grad(teacher, student, zt, -1.0) if need_teacher else None
    return grad_s, grad_t
