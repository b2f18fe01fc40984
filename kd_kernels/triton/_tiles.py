"""Tile helpers shared by the Triton kernels: the policy dot, centred pairwise squared distances
(Gram route) with the near-pair test, explicit squared differences, smooth-L1.

Precision (docs/precision.md): ``PREC`` is a constexpr chosen by the launcher at call time:
``"tf32x3"`` or ``"tf32"`` (``kd_kernels._backend.fp32_dot_precision()``) on a GPU, ``"ieee"``
under the interpreter only. fp16/bf16 tiles go to ``tl.dot`` in their own dtype (fp32
accumulator); fp32 tiles use ``PREC``; under the interpreter every tile is cast to fp32 first
(its low-precision dot is unreliable), after the same rounding a GPU would see.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kd_kernels._backend import TRITON_INTERPRET, fp32_dot_precision


def dot_precision() -> str:
    """The ``PREC`` constexpr for this call (read at launch time, never at import)."""
    return "ieee" if TRITON_INTERPRET else fp32_dot_precision()


@triton.jit
def policy_dot(a, b, acc, PREC: tl.constexpr):
    # acc + a @ b under the precision policy: a, b in one dtype (fp32 / fp16 / bf16), acc fp32.
    if PREC == "ieee":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def smooth_l1(x):
    # h(x) = x^2/2 if |x| < 1 else |x| - 1/2   (PyTorch smooth_l1_loss, beta = 1)
    ax = tl.abs(x)
    return tl.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


@triton.jit
def clamp1(x):
    # h'(x) = clamp(x, -1, 1)
    return tl.minimum(tl.maximum(x, -1.0), 1.0)


@triton.jit
def load_centred_f32(x_ptr, mean_ptr, rows, in_r, offs_k, D, stride_d):
    # The [R, BLOCK_K] tile x[rows, offs_k] - mean[offs_k] in fp32 (0 out of bounds).
    # rows: [R] int64 row offsets (row index * row stride); in_r: [R] row mask.
    in_k = offs_k < D
    m = in_r[:, None] & in_k[None, :]
    mu = tl.load(mean_ptr + offs_k, mask=in_k, other=0.0)
    x = tl.load(x_ptr + rows[:, None] + offs_k.to(tl.int64)[None, :] * stride_d, mask=m, other=0.0)
    return tl.where(m, x.to(tl.float32) - mu[None, :], 0.0)


@triton.jit
def load_centred(x_ptr, mean_ptr, rows, in_r, offs_k, D, stride_d):
    # The same tile centred in fp32 and, for fp16/bf16 inputs, rounded back to the input dtype:
    # the MMA operand (no centred copy in memory). fp32 inputs: unchanged.
    return load_centred_f32(x_ptr, mean_ptr, rows, in_r, offs_k, D, stride_d).to(x_ptr.dtype.element_ty)


# Gram route (docs/rkd.md section 1):
#   E_ij = s_i + s_j - 2 x~_i . x~_j,  s_i = |x~_i|^2,  x~ = x - mean   (one tl.dot per D chunk)
# s is summed from the same (rounded) operands as the dot, so E is the squared distance of the
# points the MMA saw. Returns (E [BM, BN] fp32, s_i [BM], s_j [BN]).
@triton.jit
def gram_sqdist(
    x_ptr,  # [N, D] features (fp32 / fp16 / bf16), strides (stride_n, stride_d)
    mean_ptr,  # [D] fp32 column mean of x
    stride_n,  # row stride of x (elements)
    stride_d,  # column stride of x (elements)
    N,  # rows
    D,  # width
    offs_i,  # [BM] row indices of the tile
    offs_j,  # [BN] column indices of the tile
    BM: tl.constexpr,  # tile rows
    BN: tl.constexpr,  # tile columns
    BK: tl.constexpr,  # D chunk per tl.dot
    PREC: tl.constexpr,  # fp32 dot precision: "tf32x3" | "tf32" | "ieee" (interpreter)
):
    in_i = offs_i < N
    in_j = offs_j < N
    row_i = offs_i.to(tl.int64) * stride_n
    row_j = offs_j.to(tl.int64) * stride_n
    gram = tl.zeros([BM, BN], dtype=tl.float32)
    sq_i = tl.zeros([BM], dtype=tl.float32)
    sq_j = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        xi = load_centred(x_ptr, mean_ptr, row_i, in_i, offs_k, D, stride_d)
        xj = load_centred(x_ptr, mean_ptr, row_j, in_j, offs_k, D, stride_d)
        gram = policy_dot(xi, tl.trans(xj), gram, PREC)
        xi32 = xi.to(tl.float32)
        xj32 = xj.to(tl.float32)
        sq_i += tl.sum(xi32 * xi32, axis=1)
        sq_j += tl.sum(xj32 * xj32, axis=1)
    return sq_i[:, None] + sq_j[None, :] - 2.0 * gram, sq_i, sq_j


# Explicit squared differences of the ORIGINAL (uncentred) rows, upcast to fp32, written over
# the near entries of e in place (no second [BM, BN] accumulator: registers):
#   E_ij = sum_k (x_ik - x_jk)^2   where near_ij
# a per-column FMA loop over D: only called when a tile has a near pair (rare).
@triton.jit
def explicit_sqdist(e, near, x_ptr, stride_n, stride_d, N, D, offs_i, offs_j):
    in_i = offs_i < N
    in_j = offs_j < N
    row_i = offs_i.to(tl.int64) * stride_n
    row_j = offs_j.to(tl.int64) * stride_n
    e = tl.where(near, 0.0, e)
    for k in range(D):
        col = tl.cast(k, tl.int64) * stride_d
        xi = tl.load(x_ptr + row_i + col, mask=in_i, other=0.0).to(tl.float32)
        xj = tl.load(x_ptr + row_j + col, mask=in_j, other=0.0).to(tl.float32)
        diff = xi[:, None] - xj[None, :]
        e += tl.where(near, diff * diff, 0.0)
    return e


# The near-duplicate rule (docs/rkd.md section 4), TAU = 2^-6:
#   near_ij = i != j  and  E^gram_ij < TAU * S_ij   (in bounds)
# near pairs get E_ij := explicit_sqdist (fp32 differences of the original inputs). The explicit
# loop runs only when the tile has a near pair (a scalar branch: no host sync).
# Returns (E [BM, BN] fp32 with near pairs replaced, near mask).
@triton.jit
def sqdist_near(
    x_ptr,  # [N, D] features
    mean_ptr,  # [D] fp32 column mean of x
    stride_n,  # row stride of x
    stride_d,  # column stride of x
    N,  # rows
    D,  # width
    offs_i,  # [BM] row indices
    offs_j,  # [BN] column indices
    BM: tl.constexpr,  # tile rows
    BN: tl.constexpr,  # tile columns
    BK: tl.constexpr,  # D chunk of the Gram route
    PREC: tl.constexpr,  # fp32 dot precision
    TAU: tl.constexpr,  # near threshold relative to s_i + s_j (2^-6)
):
    e, sq_i, sq_j = gram_sqdist(x_ptr, mean_ptr, stride_n, stride_d, N, D, offs_i, offs_j, BM, BN, BK, PREC)
    inb = (offs_i[:, None] < N) & (offs_j[None, :] < N) & (offs_i[:, None] != offs_j[None, :])
    near = inb & (e < TAU * (sq_i[:, None] + sq_j[None, :]))
    if tl.max(near.to(tl.int32)) > 0:
        e = explicit_sqdist(e, near, x_ptr, stride_n, stride_d, N, D, offs_i, offs_j)
    return tl.maximum(e, 0.0), near


def nan_carrier(*xs: torch.Tensor) -> torch.Tensor:
    """0-dim float32: 0 when every ``x`` is finite, NaN when one holds a NaN or an inf.

    ``0 * max + 0 * min`` per tensor: no host sync, no overflow for large finite values. The RKD
    launchers add it to the loss and the gradients, because the kernels' masks (``E > 0``,
    ``E >= 1e-12``) are False for NaN and would otherwise give a finite loss (README
    "Non-finite input")."""
    out = xs[0].new_zeros((), dtype=torch.float32)
    for x in xs:
        out = out + x.amax().float().mul(0.0) + x.amin().float().mul(0.0)
    return out
