"""Triton kernels of the RKD distance loss (forward and backward); math in docs/rkd.md.

Passes: forward = pass 1 (per-tile sums of d_s, d_t -> mu_s, mu_t) + pass 2 (per-tile sums of
the smooth-L1 terms, or the [N, N] store for reduction="none"). Backward = a statistics pass
(the path through mu) + one pass per needed gradient, which recomputes the tiles and adds
the Laplacian form rowsum(A) x~_i - A x~_j into dX with relaxed atomics over D chunks, and the
near pairs' explicit differences. Memory: O(N + D) besides the outputs; per-program partial
buffers (summed by torch, no host sync). Every pair tile is a Gram tile on tensor cores
(``_tiles.sqdist_near``), with the near-duplicate rule of docs/rkd.md section 4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kd_kernels._backend import TRITON_INTERPRET
from kd_kernels.triton._tiles import (
    clamp1,
    dot_precision,
    load_centred,
    load_centred_f32,
    nan_carrier,
    policy_dot,
    smooth_l1,
    sqdist_near,
)

__all__ = ["DISTANCE_CONFIGS", "pick_pair_config", "rkd_distance_bwd_triton", "rkd_distance_fwd_triton"]

# pdist's clamp on squared distances (reference: sqrt(max(E, 1e-12)))
_CLAMP = 1e-12
# docs/rkd.md section 4: near pairs E^gram < TAU * (s_i + s_j) take explicit differences
TAU = 2.0**-6

# Launch configurations of every pair-tile kernel (distance passes and the angle E buffer).
# Why: 8 warps on a 64x64 tile put 16 fp32 registers per thread in each [64, 64] tile, and two
# or three are live at once (the first network's d^, the second's accumulator, A in the
# backward). fp32 runs 3xTF32 (hi/lo operand splits in registers): BLOCK_K = 16 fp32 columns
# keeps the split operands small enough for sm_80's mma.sync (32 columns spilled there) and 2
# stages. 16-bit: BLOCK_K = 64 columns = 128-byte rows per load, 3 stages to hide load latency.
# "small_d": D <= 64 is one or two K steps, so 2 stages (less shared memory, more programs/SM).
# "unaligned_*": rows not 16-byte aligned (odd widths, strided views): no cp.async, so a
# pipelined K loop would hold every stage in registers; 1 stage.
# "interpret": 32-wide tiles, cheap to interpret, and N = 40/70 tests span several tiles.
DISTANCE_CONFIGS = {
    "fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2),
    "16bit": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    "small_d": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2),
    "unaligned_fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=1),
    "unaligned_16bit": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=1),
    "interpret": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1),
}


def _aligned(x: torch.Tensor) -> bool:
    """Rows start on 16-byte boundaries and are contiguous (vector / cp.async loads)."""
    return x.stride(1) == 1 and (x.stride(0) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0


def pick_pair_config(*xs: torch.Tensor) -> dict:
    """The DISTANCE_CONFIGS entry for these inputs (by dtype, alignment and width)."""
    if TRITON_INTERPRET:
        return DISTANCE_CONFIGS["interpret"]
    fp32 = any(x.dtype == torch.float32 for x in xs)
    if not all(_aligned(x) for x in xs):
        return DISTANCE_CONFIGS["unaligned_fp32" if fp32 else "unaligned_16bit"]
    if max(x.shape[1] for x in xs) <= 64:
        return DISTANCE_CONFIGS["small_d"]
    return DISTANCE_CONFIGS["fp32" if fp32 else "16bit"]


def check_inputs(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> None:
    """float64 never reaches these kernels (the ops route it to the PyTorch path)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(
                f"Triton RKD kernels take float32/float16/bfloat16 {name}, got {x.dtype} "
                "(float64 runs on the PyTorch path: kd_kernels.torch_impl.rkd)"
            )


# Forward (docs/rkd.md sections 1, 4), per network:
#   E_ij from sqdist_near (Gram route, explicit for near pairs);  d_ij = sqrt(max(E_ij, 1e-12)),
#   d_ii = 0;  mu = sum_{i != j} d_ij / (N (N - 1));  d^_ij = d_ij / mu
#   loss_ij = h(d^s_ij - d^t_ij)  (smooth-L1, beta 1);  "mean": sum / N^2, "sum", "none": [N, N]
@triton.jit
def _pair_dists(
    x_ptr, mean_ptr, stride_n, stride_d, N, D, offs_i, offs_j,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, TAU: tl.constexpr,
    CLAMP: tl.constexpr,
):  # fmt: skip
    # (d [BM, BN] with 0 on the diagonal and out of bounds, E, near) of one network's tile
    e, near = sqdist_near(x_ptr, mean_ptr, stride_n, stride_d, N, D, offs_i, offs_j, BM, BN, BK, PREC, TAU)
    off_diag = (offs_i[:, None] < N) & (offs_j[None, :] < N) & (offs_i[:, None] != offs_j[None, :])
    d = tl.where(off_diag, tl.sqrt_rn(tl.maximum(e, CLAMP)), 0.0)
    return d, e, near


@triton.jit
def _rkd_distance_mean_kernel(
    s_ptr,  # [N, Ds] student features
    t_ptr,  # [N, Dt] teacher features
    s_mean_ptr,  # [Ds] fp32 column mean of the student
    t_mean_ptr,  # [Dt] fp32 column mean of the teacher
    partial_ptr,  # [num_programs, 2] fp32 out: per-tile sums of d_s and d_t
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
    PREC: tl.constexpr,  # fp32 dot precision
    TAU: tl.constexpr,  # near threshold (2^-6)
    CLAMP: tl.constexpr,  # squared-distance clamp (1e-12)
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    pid = pid_i * tl.num_programs(1) + pid_j
    # one network at a time: the student's accumulator is dead before the teacher's starts
    d_s, _, _ = _pair_dists(
        s_ptr, s_mean_ptr, stride_sn, stride_sd, N, Ds, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, PREC, TAU, CLAMP
    )
    tl.store(partial_ptr + 2 * pid, tl.sum(d_s))
    d_t, _, _ = _pair_dists(
        t_ptr, t_mean_ptr, stride_tn, stride_td, N, Dt, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, PREC, TAU, CLAMP
    )
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(d_t))


@triton.jit
def _rkd_distance_fwd_kernel(
    s_ptr,  # [N, Ds] student features
    t_ptr,  # [N, Dt] teacher features
    s_mean_ptr,  # [Ds] fp32 column mean of the student
    t_mean_ptr,  # [Dt] fp32 column mean of the teacher
    mu_ptr,  # [2] fp32 (mu_s, mu_t) from pass 1
    out_ptr,  # REDUCE_NONE: [N, N] contiguous loss (student dtype); else [num_programs] fp32 partials
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
    PREC: tl.constexpr,  # fp32 dot precision
    TAU: tl.constexpr,  # near threshold (2^-6)
    CLAMP: tl.constexpr,  # squared-distance clamp (1e-12)
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_b = (offs_i[:, None] < N) & (offs_j[None, :] < N)
    d_s, _, _ = _pair_dists(
        s_ptr, s_mean_ptr, stride_sn, stride_sd, N, Ds, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, PREC, TAU, CLAMP
    )
    # d * (1/mu) keeps the reference's 0/0 = NaN for N = 1 (an empty mean)
    dh_s = d_s * (1.0 / tl.load(mu_ptr))
    d_t, _, _ = _pair_dists(
        t_ptr, t_mean_ptr, stride_tn, stride_td, N, Dt, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, PREC, TAU, CLAMP
    )
    h = smooth_l1(dh_s - d_t * (1.0 / tl.load(mu_ptr + 1)))
    if REDUCE_NONE:
        tl.store(out_ptr + offs_i.to(tl.int64)[:, None] * N + offs_j[None, :], h, mask=in_b)
    else:
        tl.store(out_ptr + pid_i * tl.num_programs(1) + pid_j, tl.sum(tl.where(in_b, h, 0.0)))


@triton.jit
def _upstream_pair_grad(grad_ptr, stride_g0, stride_g1, grad_scale, offs_i, offs_j, mask, GRAD_IS_MATRIX: tl.constexpr):
    # (G_ij, G_ji): dLoss/dh on the tile; grad_ptr is 0-dim, or [N, N] for reduction="none"
    if GRAD_IS_MATRIX:
        ri = offs_i.to(tl.int64)
        rj = offs_j.to(tl.int64)
        g_ij = tl.load(grad_ptr + ri[:, None] * stride_g0 + rj[None, :] * stride_g1, mask=mask, other=0.0)
        g_ji = tl.load(grad_ptr + rj[None, :] * stride_g0 + ri[:, None] * stride_g1, mask=mask, other=0.0)
        return g_ij.to(tl.float32) * grad_scale, g_ji.to(tl.float32) * grad_scale
    else:
        g = tl.load(grad_ptr).to(tl.float32) * grad_scale
        return g, g


# Backward (docs/rkd.md sections 2, 4). G_ij = dLoss/dh_ij (grad/N^2, grad, or grad[i, j]),
# h'(x) = clamp(x, -1, 1), M = N (N - 1), sign = +1 (student) / -1 (teacher):
#   g_ij = sign G_ij h'(d^s_ij - d^t_ij);  c = (1/M) sum_ij g_ij d^_ij   (statistics pass)
#   A_ij = (w_ij + w_ji) / d_ij,  w_ij = (g_ij - c) / mu   on live pairs (E_ij >= 1e-12)
#   far pairs:  dx_i += rowsum(A_far)_i x~_i - sum_j A_far_ij x~_j   (tensor-core dot per D chunk)
#   near pairs: dx_i += sum_j A_near_ij (x_i - x_j)   explicit fp32 differences of the original
#               rows (a per-column loop over D, only in tiles that have a near pair)
@triton.jit
def _rkd_distance_bwd_stats_kernel(
    s_ptr,  # [N, Ds] student features
    t_ptr,  # [N, Dt] teacher features
    s_mean_ptr,  # [Ds] fp32 column mean of the student
    t_mean_ptr,  # [Dt] fp32 column mean of the teacher
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
    PREC: tl.constexpr,  # fp32 dot precision
    TAU: tl.constexpr,  # near threshold (2^-6)
    CLAMP: tl.constexpr,  # squared-distance clamp (1e-12)
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_b = (offs_i[:, None] < N) & (offs_j[None, :] < N)
    d_s, _, _ = _pair_dists(
        s_ptr, s_mean_ptr, stride_sn, stride_sd, N, Ds, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, PREC, TAU, CLAMP
    )
    dh_s = d_s * (1.0 / tl.load(mu_ptr))
    d_t, _, _ = _pair_dists(
        t_ptr, t_mean_ptr, stride_tn, stride_td, N, Dt, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, PREC, TAU, CLAMP
    )
    dh_t = d_t * (1.0 / tl.load(mu_ptr + 1))
    g_ij, _ = _upstream_pair_grad(grad_ptr, stride_g0, stride_g1, grad_scale, offs_i, offs_j, in_b, GRAD_IS_MATRIX)
    g = tl.where(in_b, g_ij * clamp1(dh_s - dh_t), 0.0)
    pid = pid_i * tl.num_programs(1) + pid_j
    tl.store(partial_ptr + 2 * pid, tl.sum(g * dh_s))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(g * dh_t))


@triton.jit
def _rkd_distance_bwd_kernel(
    x_ptr,  # [N, Dx] features of the side whose gradient is computed ("self")
    y_ptr,  # [N, Dy] features of the other side
    x_mean_ptr,  # [Dx] fp32 column mean of x
    y_mean_ptr,  # [Dy] fp32 column mean of y
    mu_ptr,  # [2] fp32 (mu_self, mu_other)
    c_ptr,  # [1] fp32 c of the self side (statistics pass, sign included)
    grad_ptr,  # upstream grad: 0-dim, or [N, N] when GRAD_IS_MATRIX
    stride_g0,  # grad row stride
    stride_g1,  # grad column stride
    grad_scale,  # 1/N^2 for "mean", else 1
    dx_ptr,  # [N, Dx] fp32 contiguous, zero-initialised: dLoss/dx (relaxed atomics)
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
    PREC: tl.constexpr,  # fp32 dot precision
    TAU: tl.constexpr,  # near threshold (2^-6)
    CLAMP: tl.constexpr,  # squared-distance clamp (1e-12)
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_i = offs_i < N
    in_j = offs_j < N
    in_b = in_i[:, None] & in_j[None, :]
    d_y, _, _ = _pair_dists(
        y_ptr, y_mean_ptr, stride_yn, stride_yd, N, Dy, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, PREC, TAU, CLAMP
    )
    dh_y = d_y * (1.0 / tl.load(mu_ptr + 1))
    d_x, e_x, near = _pair_dists(
        x_ptr, x_mean_ptr, stride_xn, stride_xd, N, Dx, offs_i, offs_j, BLOCK_M, BLOCK_N, BLOCK_K, PREC, TAU, CLAMP
    )
    mu_x = tl.load(mu_ptr)
    g_ij, g_ji = _upstream_pair_grad(grad_ptr, stride_g0, stride_g1, grad_scale, offs_i, offs_j, in_b, GRAD_IS_MATRIX)
    # h' is symmetric in (i, j), so w_ij + w_ji = (sign h' (G_ij + G_ji) - 2c) / mu
    hp = clamp1(SIGN * (d_x * (1.0 / mu_x) - dh_y))
    w_sum = (SIGN * hp * (g_ij + g_ji) - 2.0 * tl.load(c_ptr)) / mu_x
    live = in_b & (offs_i[:, None] != offs_j[None, :]) & (e_x >= CLAMP)
    a = tl.where(live, w_sum / d_x, 0.0)
    a_far = tl.where(near, 0.0, a)
    rowsum = tl.sum(a_far, axis=1)
    # fp16 has a narrow range (A ~ grad/N^2/d can underflow): scale the MMA operand to max 1
    # per tile and undo it on the fp32 result (a no-op in effect for fp32/bf16)
    amax = tl.max(tl.abs(a_far))
    inv_scale = tl.where(amax > 0.0, amax, 1.0)
    a_op = (a_far * (1.0 / inv_scale)).to(x_ptr.dtype.element_ty)
    row_i = offs_i.to(tl.int64) * stride_xn
    row_j = offs_j.to(tl.int64) * stride_xn
    out_i = offs_i.to(tl.int64) * Dx
    for k0 in range(0, Dx, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m_i = in_i[:, None] & (offs_k < Dx)[None, :]
        xi = load_centred_f32(x_ptr, x_mean_ptr, row_i, in_i, offs_k, Dx, stride_xd)
        xj = load_centred(x_ptr, x_mean_ptr, row_j, in_j, offs_k, Dx, stride_xd)
        lap = policy_dot(a_op, xj, tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), PREC)
        upd = rowsum[:, None] * xi - lap * inv_scale
        tl.atomic_add(dx_ptr + out_i[:, None] + offs_k[None, :], upd, mask=m_i, sem="relaxed")
    if tl.max(near.to(tl.int32)) > 0:
        a_near = tl.where(near, a, 0.0)
        for k in range(Dx):
            col = tl.cast(k, tl.int64) * stride_xd
            xi_k = tl.load(x_ptr + row_i + col, mask=in_i, other=0.0).to(tl.float32)
            xj_k = tl.load(x_ptr + row_j + col, mask=in_j, other=0.0).to(tl.float32)
            val = tl.sum(a_near * (xi_k[:, None] - xj_k[None, :]), axis=1)
            tl.atomic_add(dx_ptr + out_i + k, val, mask=in_i, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _pair_args(x: torch.Tensor, y: torch.Tensor) -> tuple[tuple, tuple]:
    """Pointer arguments (x, y, fp32 column means) and sizes (N, widths, strides), x first."""
    ptrs = (x, y, x.mean(dim=0, dtype=torch.float32), y.mean(dim=0, dtype=torch.float32))
    sizes = (x.shape[0], x.shape[1], y.shape[1], x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    return ptrs, sizes


def _launch_kw(cfg: dict) -> dict:
    return dict(cfg, PREC=dot_precision(), TAU=TAU, CLAMP=_CLAMP)


def rkd_distance_fwd_triton(
    student: torch.Tensor, teacher: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RKD distance loss forward (two passes over pair tiles).

    Args:
        student: ``[N, Ds]`` features (fp32, fp16 or bf16; float64 raises: it runs on the
            PyTorch path).
        teacher: ``[N, Dt]`` features on the same device.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (``[N, N]`` per-pair smooth-L1 terms).

    Returns:
        ``(loss, mu_s, mu_t)``: the loss in the student's dtype and the 0-dim float32 mean
        off-diagonal distances (saved for the backward).
    """
    check_inputs(student, teacher, reduction)
    n = student.shape[0]
    cfg = pick_pair_config(student, teacher)
    kw = _launch_kw(cfg)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    ptrs, sizes = _pair_args(student, teacher)
    partial = torch.empty(grid[0] * grid[1], 2, device=student.device, dtype=torch.float32)
    _rkd_distance_mean_kernel[grid](*ptrs, partial, *sizes, **kw)
    # N = 1: 0/0 = NaN, as the reference's empty mean; two separate sums, so the returned
    # means do not alias each other (custom ops may not return aliased outputs)
    mu_s, mu_t = (partial[:, k].sum() / float(n * (n - 1)) for k in range(2))
    # NaN carrier: the kernels' clamp mask maps NaN distances to the clamp; a NaN mean reaches the
    # loss and, saved for the backward, both gradients
    mu_s = mu_s + nan_carrier(student)
    mu_t = mu_t + nan_carrier(teacher)
    mu = torch.stack([mu_s, mu_t])
    if reduction == "none":
        out = torch.empty(n, n, device=student.device, dtype=student.dtype)
    else:
        out = torch.empty(grid[0] * grid[1], device=student.device, dtype=torch.float32)
    _rkd_distance_fwd_kernel[grid](*ptrs, mu, out, *sizes, REDUCE_NONE=reduction == "none", **kw)
    if reduction == "none":
        loss = out
    else:
        loss = (out.sum() / float(n * n) if reduction == "mean" else out.sum()).to(student.dtype)
    return loss, mu_s, mu_t


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
    """RKD distance loss backward (a statistics pass, then dX per needed side).

    Args:
        grad: upstream gradient, 0-dim for ``"mean"``/``"sum"``, ``[N, N]`` for ``"none"``.
        student, teacher: the forward's inputs.
        mu_s, mu_t: the 0-dim means returned by :func:`rkd_distance_fwd_triton`.
        reduction: as in the forward.
        need_student, need_teacher: which gradients to compute.

    Returns:
        ``(grad_student, grad_teacher)`` in each input's dtype (contiguous), ``None`` where not
        needed. Pairs at the 1e-12 clamp (e.g. identical rows) pass no gradient.
    """
    check_inputs(student, teacher, reduction)
    if not (need_student or need_teacher):
        return None, None
    n = student.shape[0]
    cfg = pick_pair_config(student, teacher)
    kw = _launch_kw(cfg)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    mu = torch.stack([mu_s, mu_t]).to(torch.float32)
    if reduction == "none":
        gargs, is_matrix = (grad, grad.stride(0), grad.stride(1), 1.0), True
    else:
        gargs, is_matrix = (grad, 0, 0, 1.0 / (n * n) if reduction == "mean" else 1.0), False
    ptrs, sizes = _pair_args(student, teacher)
    partial = torch.empty(grid[0] * grid[1], 2, device=student.device, dtype=torch.float32)
    _rkd_distance_bwd_stats_kernel[grid](*ptrs, mu, *gargs, partial, *sizes, GRAD_IS_MATRIX=is_matrix, **kw)
    # c_s = (1/M) sum g d^s; the teacher's g has the opposite sign, so c_t = -(1/M) sum g d^t
    # (negated on the device: a host-built [1, -1] factor would be a blocking copy)
    c = partial.sum(dim=0) / float(n * (n - 1))
    c = torch.stack((c[0], -c[1]))

    def side_grad(x, y, mu_xy, c_x, sign):
        dx = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        p, s = _pair_args(x, y)
        _rkd_distance_bwd_kernel[grid](*p, mu_xy, c_x, *gargs, dx, *s, SIGN=sign, GRAD_IS_MATRIX=is_matrix, **kw)
        return (dx + mu_xy.sum().mul(0.0)).to(x.dtype)  # NaN mean (non-finite input) -> NaN gradient

    grad_s = side_grad(student, teacher, mu, c[0:1], 1.0) if need_student else None
    grad_t = side_grad(teacher, student, mu.flip(0), c[1:2], -1.0) if need_teacher else None
    return grad_s, grad_t
