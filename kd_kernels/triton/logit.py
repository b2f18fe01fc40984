"""Triton kernels of Hinton KD (``kd_loss``), reverse KL (``reverse_kl_loss``), TVD (``tvd_loss``),
generalised JSD (``jsd_loss``), DIST (``dist_loss``) and GRKD (``grkd_loss``); math: docs/logit.md
sections 3-6, 8 and 9. Forward and student backward, one program per row, the vocabulary
streamed in tiles (no rows x vocab buffer); DIST's column statistics and GRKD's pair grid are
described at their kernels below.

Forward, per row (u = z / T): one pass keeps online log-sum-exp states of both rows,
(m_s, S_s = sum exp(u_s - m_s)) and (m_t, S_t = sum exp(u_t - m_t), A = sum exp(u_t - m_t)(u_t - u_s)),
rescaling by exp(m_old - m_new) when a running max grows (0 for an empty state, so -inf - -inf never
occurs); then lse = m + log S and

    row_loss = T^2 (A / S_t - lse_t + lse_s)          (= T^2 KL(p || q), sum_c p_c = 1)

Classes with p_c = 0 (teacher logit -inf: vocabulary masking) contribute no term. NaN propagates
through S (and +inf through exp(inf - inf)); dropped rows (ignore_mask) store 0.
Backward (student): dL/dz_s = grad_row * T (q - p), q = exp(u_s - lse_s), p = exp(u_t - lse_t),
recomputed tile by tile from the saved lse (0 for dropped rows), written in the student's dtype.
Reverse KL is KL(q || p): the forward kernel with the two inputs' roles swapped (and no T^2);
its student backward dL/dz_s = grad_row * q ((u_s - lse_s) - (u_t - lse_t) - L) / T needs the row
value L first: two passes over the tiles (L, then the gradient; q = 0 classes give 0).
TVD, L = 1/2 sum |p - q|, needs both lse before its value: the KD forward kernel gives them, a
second pass the value; its student backward, q (g - <q, g>) / T with g = sign(q - p) / 2, makes
two passes (<q, g>, then the gradient).
The teacher's gradient (rare: teachers are detached) runs on the PyTorch path, as for the CUDA kernel.
No tl.dot: memory-bound streaming, fp32 arithmetic for every input dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kd_kernels._backend import TRITON_INTERPRET

__all__ = [
    "DIST_BWD_BLOCK_C",
    "DIST_CONFIGS",
    "GRKD_CONFIGS",
    "KD_CONFIGS",
    "dist_bwd_triton",
    "dist_fwd_triton",
    "grkd_bwd_triton",
    "grkd_fwd_triton",
    "jsd_bwd_triton",
    "jsd_fwd_triton",
    "kd_bwd_triton",
    "kd_fwd_triton",
    "reverse_kl_bwd_triton",
    "reverse_kl_fwd_triton",
    "tvd_bwd_triton",
    "tvd_fwd_triton",
]

# BLOCK_C: vocabulary tile per step; 4 warps stream 2048 fp32 columns (16 per thread) per load.
# maxnreg=255: without it ptxas's occupancy heuristic held _tvd_bwd_kernel at 56 registers and
# spilled 4 B (sm_80, odd shape; compile gate).
# The interpreter takes small tiles (odd vocabularies span several tiles in the tests).
KD_CONFIGS = {
    "gpu": {"BLOCK_C": 2048, "num_warps": 4, "num_stages": 1, "maxnreg": 255},
    "interpret": {"BLOCK_C": 64, "num_warps": 1, "num_stages": 1},
}


def _config() -> dict:
    return KD_CONFIGS["interpret" if TRITON_INTERPRET else "gpu"]


@triton.jit
def _rescale(m_old, m_new):
    # exp(m_old - m_new), 0 for an empty state (m_old = -inf; then m_new may be -inf too)
    empty = m_old == float("-inf")
    return tl.where(empty, 0.0, tl.exp(tl.where(empty, 0.0, m_old) - tl.where(empty, 0.0, m_new)))


@triton.jit
def _kd_fwd_kernel(
    s_ptr,  # [N, C] student logits (row stride stride_s, unit column stride)
    t_ptr,  # [N, C] teacher logits
    keep_ptr,  # [N] int8: 1 for rows that count
    row_ptr,  # [N] fp32 out: T^2 KL(p || q) (0 for dropped rows)
    lse_s_ptr,  # [N] fp32 out: logsumexp(z_s / T)
    lse_t_ptr,  # [N] fp32 out: logsumexp(z_t / T)
    C,  # classes
    stride_s,  # student row stride
    stride_t,  # teacher row stride
    inv_t,  # 1 / T
    t_sq,  # T^2
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    s_row = s_ptr + tl.cast(row, tl.int64) * stride_s
    t_row = t_ptr + tl.cast(row, tl.int64) * stride_t
    m_s = tl.full([BLOCK_C], float("-inf"), tl.float32)  # per-lane states, merged at the end
    s_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    m_t = tl.full([BLOCK_C], float("-inf"), tl.float32)
    s_t = tl.zeros([BLOCK_C], dtype=tl.float32)
    a_t = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        us = tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        ut = tl.load(t_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        # student: lane-wise online log-sum-exp (a NaN makes s_s NaN: it propagates)
        ms_new = tl.where(us > m_s, us, m_s)
        s_s = s_s * _rescale(m_s, ms_new) + tl.exp(us - tl.where(ms_new == float("-inf"), 0.0, ms_new))
        m_s = ms_new
        # teacher, with A = sum exp(u_t - m_t)(u_t - u_s); p_c = 0 (u_t = -inf) adds no term
        mt_new = tl.where(ut > m_t, ut, m_t)
        f = _rescale(m_t, mt_new)
        e = tl.exp(ut - tl.where(mt_new == float("-inf"), 0.0, mt_new))  # 0 for u_t = -inf
        s_t = s_t * f + e
        a_t = a_t * f + tl.where(ut == float("-inf"), 0.0, e * (ut - us))
        m_t = mt_new
    # merge the lanes: global max, then every lane rescaled to it
    gs = tl.max(m_s, axis=0)
    ss = tl.sum(s_s * _rescale(m_s, gs), axis=0)
    gt = tl.max(m_t, axis=0)
    ft = _rescale(m_t, gt)
    st = tl.sum(s_t * ft, axis=0)
    at = tl.sum(a_t * ft, axis=0)
    lse_s = gs + tl.log(ss)
    lse_t = gt + tl.log(st)
    loss = t_sq * (at / st - lse_t + lse_s)
    keep = tl.load(keep_ptr + row) != 0
    tl.store(row_ptr + row, tl.where(keep, loss, 0.0))
    tl.store(lse_s_ptr + row, lse_s)
    tl.store(lse_t_ptr + row, lse_t)


@triton.jit
def _tile_log_probs(s_ptr, t_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t):
    # (l_s, l_t) = z / T - lse of one vocabulary tile of row r64; -inf past C (probability 0)
    zs = tl.load(s_ptr + r64 * stride_s + offs, mask=inb, other=float("-inf")).to(tl.float32)
    zt = tl.load(t_ptr + r64 * stride_t + offs, mask=inb, other=float("-inf")).to(tl.float32)
    return zs * inv_t - lse_s, zt * inv_t - lse_t


@triton.jit
def _kd_bwd_kernel(
    w_ptr,  # [N] fp32: dLoss/d(row_loss) (0 for dropped rows)
    s_ptr,  # [N, C] student logits
    t_ptr,  # [N, C] teacher logits
    lse_s_ptr,  # [N] fp32 saved logsumexp(z_s / T)
    lse_t_ptr,  # [N] fp32 saved logsumexp(z_t / T)
    gs_ptr,  # [N, C] out: dLoss/dz_s (student dtype, contiguous)
    C,  # classes
    stride_s,  # student row stride
    stride_t,  # teacher row stride
    inv_t,  # 1 / T
    temperature,  # T
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    r64 = tl.cast(row, tl.int64)
    w = tl.load(w_ptr + row) * temperature
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        ls, lt = _tile_log_probs(s_ptr, t_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t)
        g = tl.where(w == 0.0, 0.0, (tl.exp(ls) - tl.exp(lt)) * w)  # dropped rows: 0 even where the row is NaN/inf
        tl.store(gs_ptr + r64 * C + offs, g.to(gs_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _reverse_kl_bwd_kernel(
    w_ptr,  # [N] fp32: dLoss/d(row_loss) (0 for dropped rows)
    s_ptr,  # [N, C] student logits
    t_ptr,  # [N, C] teacher logits
    lse_s_ptr,  # [N] fp32 saved logsumexp(z_s / T)
    lse_t_ptr,  # [N] fp32 saved logsumexp(z_t / T)
    gs_ptr,  # [N, C] out: dLoss/dz_s (student dtype, contiguous)
    C,  # classes
    stride_s,  # student row stride
    stride_t,  # teacher row stride
    inv_t,  # 1 / T
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    r64 = tl.cast(row, tl.int64)
    w = tl.load(w_ptr + row) * inv_t
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    # pass 1: L = sum_c q (l_s - l_t), q = 0 classes adding nothing
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        ls, lt = _tile_log_probs(s_ptr, t_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t)
        q = tl.exp(ls)
        acc += tl.where(q == 0.0, 0.0, q * (ls - lt))
    loss = tl.sum(acc, axis=0)
    # pass 2: dL/dz_s = q ((l_s - l_t) - L) / T, times grad_row
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        ls, lt = _tile_log_probs(s_ptr, t_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t)
        q = tl.exp(ls)
        g = tl.where(q == 0.0, 0.0, q * ((ls - lt) - loss)) * w
        g = tl.where(w == 0.0, 0.0, g)  # dropped rows: 0 even where the row is NaN/inf
        tl.store(gs_ptr + r64 * C + offs, g.to(gs_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _tvd_fwd_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [N, C] teacher logits
    keep_ptr,  # [N] int8: 1 for rows that count
    lse_s_ptr,  # [N] fp32 logsumexp(z_s / T) (from the KD forward kernel)
    lse_t_ptr,  # [N] fp32 logsumexp(z_t / T)
    row_ptr,  # [N] fp32 out: 1/2 sum |p - q| (0 for dropped rows)
    C,  # classes
    stride_s,  # student row stride
    stride_t,  # teacher row stride
    inv_t,  # 1 / T
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    r64 = tl.cast(row, tl.int64)
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        ls, lt = _tile_log_probs(s_ptr, t_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t)
        q, p = tl.exp(ls), tl.exp(lt)
        acc += tl.abs(p - q)
    keep = tl.load(keep_ptr + row) != 0
    tl.store(row_ptr + row, tl.where(keep, 0.5 * tl.sum(acc, axis=0), 0.0))


@triton.jit
def _tvd_bwd_kernel(
    w_ptr,  # [N] fp32: dLoss/d(row_loss) (0 for dropped rows)
    s_ptr,  # [N, C] student logits
    t_ptr,  # [N, C] teacher logits
    lse_s_ptr,  # [N] fp32 saved logsumexp(z_s / T)
    lse_t_ptr,  # [N] fp32 saved logsumexp(z_t / T)
    gs_ptr,  # [N, C] out: dLoss/dz_s (student dtype, contiguous)
    C,  # classes
    stride_s,  # student row stride
    stride_t,  # teacher row stride
    inv_t,  # 1 / T
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    r64 = tl.cast(row, tl.int64)
    w = tl.load(w_ptr + row) * inv_t
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)  # pass 1: <q, g>
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        ls, lt = _tile_log_probs(s_ptr, t_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t)
        q, p = tl.exp(ls), tl.exp(lt)
        g = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))  # sign(0) = 0 (NaN -> 0 here, see below)
        g = tl.where((q == q) & (p == p), g, q + p)  # a NaN q or p keeps g NaN
        acc += q * g
    qg = tl.sum(acc, axis=0)
    for c0 in range(0, C, BLOCK_C):  # pass 2: q (g - <q, g>) / T, times grad_row
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        ls, lt = _tile_log_probs(s_ptr, t_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t)
        q, p = tl.exp(ls), tl.exp(lt)
        g = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
        g = tl.where((q == q) & (p == p), g, q + p)
        out = tl.where(w == 0.0, 0.0, q * (g - qg) * w)  # dropped rows: 0 even where the row is NaN/inf
        tl.store(gs_ptr + r64 * C + offs, out.to(gs_ptr.dtype.element_ty), mask=inb)


def _keep(ignore_mask: torch.Tensor | None, n: int, device) -> torch.Tensor:
    if ignore_mask is None:
        return torch.ones(n, dtype=torch.int8, device=device)
    return (~ignore_mask.to(torch.bool)).to(torch.int8)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def kd_fwd_triton(student, teacher, temperature, ignore_mask=None):
    """``(row_loss [N], lse_s [N], lse_t [N])`` float32, as ``torch_impl.logit.kd_fwd``."""
    student, teacher = _rows(student), _rows(teacher)
    n, c = student.shape
    row, lse_s, lse_t = (torch.empty(n, device=student.device, dtype=torch.float32) for _ in range(3))
    if n:
        _kd_fwd_kernel[(n,)](
            student, teacher, _keep(ignore_mask, n, student.device), row, lse_s, lse_t, c,
            student.stride(0), teacher.stride(0), 1.0 / float(temperature), float(temperature) ** 2, **_config(),
        )  # fmt: skip
    return row, lse_s, lse_t


def _student_grad(kernel, grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, *scalars):
    """Launch a student-backward kernel: ``[N, C]`` in the student's dtype."""
    s, t = _rows(student), _rows(teacher)
    n, c = s.shape
    w = grad_row.to(torch.float32)
    if ignore_mask is not None:
        w = torch.where(ignore_mask.to(torch.bool), 0.0, w)
    gs = torch.empty(n, c, device=s.device, dtype=student.dtype)
    if n:
        kernel[(n,)](
            w.contiguous(), s, t, lse_s.float().contiguous(), lse_t.float().contiguous(), gs, c,
            s.stride(0), t.stride(0), 1.0 / float(temperature), *scalars, **_config(),
        )  # fmt: skip
    return gs


def reverse_kl_fwd_triton(student, teacher, temperature, ignore_mask=None):
    """``(row_loss [N], lse_s [N], lse_t [N])`` of reverse KL KL(q || p): the KD forward kernel with
    the inputs' roles swapped and no T^2."""
    student, teacher = _rows(student), _rows(teacher)
    n, c = student.shape
    row, lse_s, lse_t = (torch.empty(n, device=student.device, dtype=torch.float32) for _ in range(3))
    if n:
        _kd_fwd_kernel[(n,)](
            teacher, student, _keep(ignore_mask, n, student.device), row, lse_t, lse_s, c,
            teacher.stride(0), student.stride(0), 1.0 / float(temperature), 1.0, **_config(),
        )  # fmt: skip
    return row, lse_s, lse_t


def reverse_kl_bwd_triton(
    grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, need_student, need_teacher
):
    """``(grad_student, grad_teacher)`` as ``torch_impl.logit.reverse_kl_bwd`` (the teacher's on
    the PyTorch path; an unneeded gradient is an empty tensor)."""
    from kd_kernels.torch_impl import logit as _impl

    gs = student.new_empty(0)
    if need_student:
        gs = _student_grad(_reverse_kl_bwd_kernel, grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask)
    gt = teacher.new_empty(0)
    if need_teacher:
        gt = _impl.reverse_kl_bwd(grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, False, True)[1]
    return gs, gt


def kd_bwd_triton(grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, need_student, need_teacher):
    """``(grad_student, grad_teacher)`` as ``torch_impl.logit.kd_bwd`` (the teacher's on the
    PyTorch path; an unneeded gradient is an empty tensor)."""
    from kd_kernels.torch_impl import logit as _impl

    gs = student.new_empty(0)
    if need_student:
        gs = _student_grad(_kd_bwd_kernel, grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask,
                           float(temperature))  # fmt: skip
    gt = teacher.new_empty(0)
    if need_teacher:
        gt = _impl.kd_bwd(grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, False, True)[1]
    return gs, gt


def tvd_fwd_triton(student, teacher, temperature, ignore_mask=None):
    """``(row_loss [N], lse_s [N], lse_t [N])`` of TVD: both lse from the KD forward kernel, then
    the value pass."""
    _, lse_s, lse_t = kd_fwd_triton(student, teacher, temperature, None)
    student, teacher = _rows(student), _rows(teacher)
    n, c = student.shape
    row = torch.empty(n, device=student.device, dtype=torch.float32)
    if n:
        _tvd_fwd_kernel[(n,)](
            student, teacher, _keep(ignore_mask, n, student.device), lse_s, lse_t, row, c,
            student.stride(0), teacher.stride(0), 1.0 / float(temperature), **_config(),
        )  # fmt: skip
    return row, lse_s, lse_t


def tvd_bwd_triton(grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, need_student, need_teacher):
    """``(grad_student, grad_teacher)`` as ``torch_impl.logit.tvd_bwd`` (the teacher's on the
    PyTorch path; an unneeded gradient is an empty tensor)."""
    from kd_kernels.torch_impl import logit as _impl

    gs = student.new_empty(0)
    if need_student:
        gs = _student_grad(_tvd_bwd_kernel, grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask)
    gt = teacher.new_empty(0)
    if need_teacher:
        gt = _impl.tvd_bwd(grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, False, True)[1]
    return gs, gt


# ------------------------------------------------------------------------------------------
# Generalised JSD (docs/logit.md section 5): both lse from the KD forward kernel, then one value
# pass; student backward in two passes (KL(q || M), then the gradient). beta = 0 and beta = 1 are
# the KD (without T^2) and reverse-KL kernels, as the torch path defines the endpoints.
# ------------------------------------------------------------------------------------------


@triton.jit
def _log_mix(ls, lt, log_b, log_1mb):
    # log M = logaddexp(log b + l_t, log(1 - b) + l_s); -inf where both are -inf (no -inf - -inf)
    a = lt + log_b
    b = ls + log_1mb
    mx = tl.where(a > b, a, b)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    return tl.where(mx == float("-inf"), float("-inf"), safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe)))


@triton.jit
def _jsd_fwd_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [N, C] teacher logits
    keep_ptr,  # [N] int8: 1 for rows that count
    lse_s_ptr,  # [N] fp32 logsumexp(z_s / T) (from the KD forward kernel)
    lse_t_ptr,  # [N] fp32 logsumexp(z_t / T)
    row_ptr,  # [N] fp32 out: b KL(p || M) + (1 - b) KL(q || M) (0 for dropped rows)
    C,  # classes
    stride_s,  # student row stride
    stride_t,  # teacher row stride
    inv_t,  # 1 / T
    beta,  # b, 0 < b < 1
    log_b,  # log b
    log_1mb,  # log(1 - b)
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    r64 = tl.cast(row, tl.int64)
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    acc_t = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        ls, lt = _tile_log_probs(s_ptr, t_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t)
        lm = _log_mix(ls, lt, log_b, log_1mb)
        q, p = tl.exp(ls), tl.exp(lt)
        acc_t += tl.where(p == 0.0, 0.0, p * (lt - lm))  # probability-0 classes add no term
        acc_s += tl.where(q == 0.0, 0.0, q * (ls - lm))
    loss = beta * tl.sum(acc_t, axis=0) + (1.0 - beta) * tl.sum(acc_s, axis=0)
    keep = tl.load(keep_ptr + row) != 0
    tl.store(row_ptr + row, tl.where(keep, loss, 0.0))


@triton.jit
def _jsd_bwd_kernel(
    w_ptr,  # [N] fp32: dLoss/d(row_loss) (0 for dropped rows)
    s_ptr,  # [N, C] student logits
    t_ptr,  # [N, C] teacher logits
    lse_s_ptr,  # [N] fp32 saved logsumexp(z_s / T)
    lse_t_ptr,  # [N] fp32 saved logsumexp(z_t / T)
    gs_ptr,  # [N, C] out: dLoss/dz_s (student dtype, contiguous)
    C,  # classes
    stride_s,  # student row stride
    stride_t,  # teacher row stride
    inv_t,  # 1 / T
    scale,  # (1 - b) / T
    log_b,  # log b
    log_1mb,  # log(1 - b)
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    r64 = tl.cast(row, tl.int64)
    w = tl.load(w_ptr + row) * scale
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)  # pass 1: KL(q || M)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        ls, lt = _tile_log_probs(s_ptr, t_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t)
        q = tl.exp(ls)
        acc += tl.where(q == 0.0, 0.0, q * (ls - _log_mix(ls, lt, log_b, log_1mb)))
    kl = tl.sum(acc, axis=0)
    for c0 in range(0, C, BLOCK_C):  # pass 2: (1 - b) q ((l_s - log M) - KL(q || M)) / T, times grad_row
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        ls, lt = _tile_log_probs(s_ptr, t_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t)
        q = tl.exp(ls)
        qd = tl.where(q == 0.0, 0.0, q * (ls - _log_mix(ls, lt, log_b, log_1mb)))
        g = tl.where(w == 0.0, 0.0, (qd - q * kl) * w)  # dropped rows: 0 even where the row is NaN/inf
        tl.store(gs_ptr + r64 * C + offs, g.to(gs_ptr.dtype.element_ty), mask=inb)


def _jsd_logs(beta: float) -> tuple[float, float]:
    return math.log(beta), math.log1p(-beta)


def jsd_fwd_triton(student, teacher, beta, temperature, ignore_mask=None):
    """``(row_loss [N], lse_s [N], lse_t [N])`` float32, as ``torch_impl.logit.jsd_fwd``:
    beta = 0 is KL(p || q) (the KD kernel without T^2), beta = 1 is KL(q || p) (reverse KL)."""
    beta = float(beta)
    if beta == 1.0:
        return reverse_kl_fwd_triton(student, teacher, temperature, ignore_mask)
    if beta == 0.0:
        student, teacher = _rows(student), _rows(teacher)
        n, c = student.shape
        row, lse_s, lse_t = (torch.empty(n, device=student.device, dtype=torch.float32) for _ in range(3))
        if n:
            _kd_fwd_kernel[(n,)](
                student, teacher, _keep(ignore_mask, n, student.device), row, lse_s, lse_t, c,
                student.stride(0), teacher.stride(0), 1.0 / float(temperature), 1.0, **_config(),
            )  # fmt: skip
        return row, lse_s, lse_t
    _, lse_s, lse_t = kd_fwd_triton(student, teacher, temperature, None)
    student, teacher = _rows(student), _rows(teacher)
    n, c = student.shape
    row = torch.empty(n, device=student.device, dtype=torch.float32)
    if n:
        _jsd_fwd_kernel[(n,)](
            student, teacher, _keep(ignore_mask, n, student.device), lse_s, lse_t, row, c,
            student.stride(0), teacher.stride(0), 1.0 / float(temperature), beta, *_jsd_logs(beta), **_config(),
        )  # fmt: skip
    return row, lse_s, lse_t


def jsd_bwd_triton(
    grad_row, student, teacher, lse_s, lse_t, beta, temperature, ignore_mask, need_student, need_teacher
):
    """``(grad_student, grad_teacher)`` as ``torch_impl.logit.jsd_bwd`` (the teacher's on the
    PyTorch path; an unneeded gradient is an empty tensor)."""
    from kd_kernels.torch_impl import logit as _impl

    beta = float(beta)
    gs = student.new_empty(0)
    if need_student:
        if beta == 1.0:
            gs = _student_grad(
                _reverse_kl_bwd_kernel, grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask
            )
        elif beta == 0.0:  # KD gradient T (q - p) without T^2: (q - p) / T
            gs = _student_grad(_kd_bwd_kernel, grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask,
                               1.0 / float(temperature))  # fmt: skip
        else:
            gs = _student_grad(_jsd_bwd_kernel, grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask,
                               (1.0 - beta) / float(temperature), *_jsd_logs(beta))  # fmt: skip
    gt = teacher.new_empty(0)
    if need_teacher:
        gt = _impl.jsd_bwd(grad_row, student, teacher, lse_s, lse_t, beta, temperature, ignore_mask, False, True)[1]
    return gs, gt


# ------------------------------------------------------------------------------------------
# DIST (docs/logit.md section 8). Forward, two passes over the logits: (1) both lse (the KD
# forward kernel), (2) one tiled pass over [BLOCK_R rows, BLOCK_C classes] tiles that gives
#   - the row Pearson pieces  n_i^2 = sum_c (y_s - 1/C)^2, m_i^2, s_i = sum_c (y_s - 1/C)(y_t - 1/C)
#     (the row mean of a softmax is 1/C), summed over class tiles with relaxed atomics, and
#   - per-program column moments over the kept rows of its row blocks, each block centred at
#     its own mean and merged with Chan's pairwise update (no sum y^2 - K mu^2 cancellation);
# then a tiny kernel merges the P programs' partials into class_stats [5, C].
# Student backward, one program per row, two passes: (1) n, m, s of the row and the dot
# products <row_ga, y>, <col_ga, y>; (2) dz = y (g - <g, y>) / T with
# g = row_scale dr_i/da + col_scale dr_c/da_i (row_scale, col_scale on the device: no host sync).
# ------------------------------------------------------------------------------------------

DIST_CONFIGS = {
    "gpu": {"BLOCK_R": 8, "BLOCK_C": 256, "num_warps": 4, "num_stages": 1, "maxnreg": 255},
    "interpret": {"BLOCK_R": 4, "BLOCK_C": 64, "num_warps": 1, "num_stages": 1},
}
# the row backward keeps six [BLOCK_C] accumulators: 1024 columns (not KD's 2048) leave ptxas room
DIST_BWD_BLOCK_C = {"gpu": 1024, "interpret": 64}
DIST_MAX_GROUPS = 64  # P: row groups of the column-moment partials ([P, 5, C] fp32 scratch)
_DIST_EPS = 1e-8
_FP32_TINY = 1.1754943508222875e-38


def _dist_config() -> dict:
    return DIST_CONFIGS["interpret" if TRITON_INTERPRET else "gpu"]


@triton.jit
def _chan_merge(cnt, mu_s, mu_t, m2_s, m2_t, c_st, nb, mean_s, mean_t, d2_s, d2_t, d_st):
    # running (count, means, centred sums) merged with a block's: Chan et al.'s pairwise update
    total = cnt + nb
    frac = nb / tl.maximum(total, 1.0)
    cross = cnt * frac  # n_a n_b / (n_a + n_b)
    ds = mean_s - mu_s
    dt = mean_t - mu_t
    return (
        total, mu_s + ds * frac, mu_t + dt * frac,
        m2_s + d2_s + ds * ds * cross, m2_t + d2_t + dt * dt * cross, c_st + d_st + ds * dt * cross,
    )  # fmt: skip


@triton.jit
def _dist_fwd_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [N, C] teacher logits
    keep_ptr,  # [N] int8: 1 for rows that count
    lse_s_ptr,  # [N] fp32 logsumexp(z_s / T)
    lse_t_ptr,  # [N] fp32 logsumexp(z_t / T)
    rowstat_ptr,  # [3, N] fp32 out (zeroed): n^2, m^2, s of every row (atomics over class tiles)
    part_ptr,  # [P, 5, C] fp32 out: per-group (mu_s, mu_t, M2_s, M2_t, C_st) over kept rows
    cnt_ptr,  # [P] fp32 out: kept rows per group
    N,  # rows
    C,  # classes
    P,  # row groups (program_id(0) in 0..P-1 takes row blocks g, g + P, ...)
    stride_s,  # student row stride
    stride_t,  # teacher row stride
    inv_t,  # 1 / T
    inv_c,  # 1 / C
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cin = cols < C
    cnt = tl.zeros([BLOCK_C], dtype=tl.float32)  # the same in every lane
    mu_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    mu_t = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_t = tl.zeros([BLOCK_C], dtype=tl.float32)
    c_st = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(g * BLOCK_R, N, P * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rin = rows < N
        r64 = tl.cast(rows, tl.int64)
        kept = (tl.load(keep_ptr + rows, mask=rin, other=0) != 0) & rin
        lse_s = tl.load(lse_s_ptr + rows, mask=rin, other=0.0)
        lse_t = tl.load(lse_t_ptr + rows, mask=rin, other=0.0)
        m2d = rin[:, None] & cin[None, :]
        zs = tl.load(s_ptr + r64[:, None] * stride_s + cols[None, :], mask=m2d, other=float("-inf"))
        zt = tl.load(t_ptr + r64[:, None] * stride_t + cols[None, :], mask=m2d, other=float("-inf"))
        ys = tl.exp(zs.to(tl.float32) * inv_t - lse_s[:, None])
        yt = tl.exp(zt.to(tl.float32) * inv_t - lse_t[:, None])
        # row pieces (centred at 1/C; class lanes past C add nothing)
        a = tl.where(m2d, ys - inv_c, 0.0)
        b = tl.where(m2d, yt - inv_c, 0.0)
        tl.atomic_add(rowstat_ptr + rows, tl.sum(a * a, axis=1), mask=rin, sem="relaxed")
        tl.atomic_add(rowstat_ptr + N + rows, tl.sum(b * b, axis=1), mask=rin, sem="relaxed")
        tl.atomic_add(rowstat_ptr + 2 * N + rows, tl.sum(a * b, axis=1), mask=rin, sem="relaxed")
        # column moments of this block's kept rows (dropped rows selected out: NaN must not leak)
        wk = kept[:, None] & cin[None, :]
        ys = tl.where(wk, ys, 0.0)
        yt = tl.where(wk, yt, 0.0)
        nb = tl.sum(kept.to(tl.float32), axis=0)
        mean_s = tl.sum(ys, axis=0) / tl.maximum(nb, 1.0)
        mean_t = tl.sum(yt, axis=0) / tl.maximum(nb, 1.0)
        ds = tl.where(wk, ys - mean_s[None, :], 0.0)
        dt = tl.where(wk, yt - mean_t[None, :], 0.0)
        cnt, mu_s, mu_t, m2_s, m2_t, c_st = _chan_merge(
            cnt, mu_s, mu_t, m2_s, m2_t, c_st, nb, mean_s, mean_t,
            tl.sum(ds * ds, axis=0), tl.sum(dt * dt, axis=0), tl.sum(ds * dt, axis=0),
        )  # fmt: skip
    base = part_ptr + tl.cast(g, tl.int64) * 5 * C + cols
    tl.store(base, mu_s, mask=cin)
    tl.store(base + C, mu_t, mask=cin)
    tl.store(base + 2 * C, m2_s, mask=cin)
    tl.store(base + 3 * C, m2_t, mask=cin)
    tl.store(base + 4 * C, c_st, mask=cin)
    tl.store(cnt_ptr + g + tl.arange(0, BLOCK_C), cnt, mask=tl.arange(0, BLOCK_C) == 0)


@triton.jit
def _dist_merge_kernel(
    part_ptr,  # [P, 5, C] fp32 per-group column moments
    cnt_ptr,  # [P] fp32 kept rows per group
    stats_ptr,  # [5, C] fp32 out: (mu_s, mu_t, n = sqrt(M2_s), m = sqrt(M2_t), s = C_st)
    C,  # classes
    P,  # row groups
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cin = cols < C
    cnt = tl.zeros([BLOCK_C], dtype=tl.float32)
    mu_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    mu_t = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_t = tl.zeros([BLOCK_C], dtype=tl.float32)
    c_st = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g in range(P):
        base = part_ptr + tl.cast(g, tl.int64) * 5 * C + cols
        nb = tl.load(cnt_ptr + g + tl.zeros([BLOCK_C], dtype=tl.int32))
        cnt, mu_s, mu_t, m2_s, m2_t, c_st = _chan_merge(
            cnt, mu_s, mu_t, m2_s, m2_t, c_st, nb,
            tl.load(base, mask=cin, other=0.0), tl.load(base + C, mask=cin, other=0.0),
            tl.load(base + 2 * C, mask=cin, other=0.0), tl.load(base + 3 * C, mask=cin, other=0.0),
            tl.load(base + 4 * C, mask=cin, other=0.0),
        )  # fmt: skip
    tl.store(stats_ptr + cols, mu_s, mask=cin)
    tl.store(stats_ptr + C + cols, mu_t, mask=cin)
    tl.store(stats_ptr + 2 * C + cols, tl.sqrt(tl.maximum(m2_s, 0.0)), mask=cin)
    tl.store(stats_ptr + 3 * C + cols, tl.sqrt(tl.maximum(m2_t, 0.0)), mask=cin)
    tl.store(stats_ptr + 4 * C + cols, c_st, mask=cin)


@triton.jit
def _dist_tile(s_ptr, t_ptr, stats_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t, inv_c, C, eps, tiny):
    # one class tile of a row: y_s, y_t, the row-centred a, b and dr_c/da_i (column Pearson,
    # saved class statistics); 0 past C
    ls, lt = _tile_log_probs(s_ptr, t_ptr, r64, stride_s, stride_t, offs, inb, inv_t, lse_s, lse_t)
    ys, yt = tl.exp(ls), tl.exp(lt)
    mu_s = tl.load(stats_ptr + offs, mask=inb, other=0.0)
    mu_t = tl.load(stats_ptr + C + offs, mask=inb, other=0.0)
    n_c = tl.load(stats_ptr + 2 * C + offs, mask=inb, other=0.0)
    m_c = tl.load(stats_ptr + 3 * C + offs, mask=inb, other=0.0)
    s_c = tl.load(stats_ptr + 4 * C + offs, mask=inb, other=0.0)
    q_c = n_c * m_c + eps
    col_ga = (yt - mu_t) / q_c - (s_c / tl.maximum(n_c, tiny) * m_c / (q_c * q_c)) * (ys - mu_s)
    a = tl.where(inb, ys - inv_c, 0.0)
    b = tl.where(inb, yt - inv_c, 0.0)
    return ys, a, b, tl.where(inb, col_ga, 0.0)


@triton.jit
def _dist_bwd_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [N, C] teacher logits
    keep_ptr,  # [N] int8: 1 for rows that count
    lse_s_ptr,  # [N] fp32 saved logsumexp(z_s / T)
    lse_t_ptr,  # [N] fp32 saved logsumexp(z_t / T)
    stats_ptr,  # [5, C] fp32 saved class statistics (mu_s, mu_t, n, m, s)
    scale_ptr,  # [2] fp32: row_scale = -T^2 grad [K>0] inter / K, col_scale = -T^2 grad [K>0] intra / C
    gs_ptr,  # [N, C] out: dLoss/dz_s (student dtype, contiguous)
    C,  # classes
    stride_s,  # student row stride
    stride_t,  # teacher row stride
    inv_t,  # 1 / T
    inv_c,  # 1 / C
    eps,  # 1e-8
    tiny,  # smallest normal fp32
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    r64 = tl.cast(row, tl.int64)
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    keep = tl.load(keep_ptr + row) != 0
    row_scale = tl.load(scale_ptr)
    col_scale = tl.load(scale_ptr + 1)
    # pass 1: n^2, m^2, s of the row; <b, y>, <a, y>, <col_ga, y>
    acc_aa = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_bb = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_ab = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_by = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_ay = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_cy = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        ys, a, b, col_ga = _dist_tile(s_ptr, t_ptr, stats_ptr, r64, stride_s, stride_t, offs, inb, inv_t,
                                      lse_s, lse_t, inv_c, C, eps, tiny)  # fmt: skip
        acc_aa += a * a
        acc_bb += b * b
        acc_ab += a * b
        acc_by += b * ys
        acc_ay += a * ys
        acc_cy += col_ga * ys
    n = tl.sqrt(tl.sum(acc_aa, axis=0))
    m = tl.sqrt(tl.sum(acc_bb, axis=0))
    s = tl.sum(acc_ab, axis=0)
    q = n * m + eps
    coef = s / tl.maximum(n, tiny) * m / (q * q)  # dr/da = b / q - coef a
    gy = row_scale * (tl.sum(acc_by, axis=0) / q - coef * tl.sum(acc_ay, axis=0)) + col_scale * tl.sum(acc_cy, axis=0)
    for c0 in range(0, C, BLOCK_C):  # pass 2: y (g - <g, y>) / T
        offs = c0 + tl.arange(0, BLOCK_C)
        inb = offs < C
        ys, a, b, col_ga = _dist_tile(s_ptr, t_ptr, stats_ptr, r64, stride_s, stride_t, offs, inb, inv_t,
                                      lse_s, lse_t, inv_c, C, eps, tiny)  # fmt: skip
        g = row_scale * (b / q - coef * a) + col_scale * col_ga
        dz = tl.where(keep, ys * (g - gy) * inv_t, 0.0)  # dropped rows: 0 even where the row is NaN/inf
        tl.store(gs_ptr + r64 * C + offs, dz.to(gs_ptr.dtype.element_ty), mask=inb)


def dist_fwd_triton(student, teacher, temperature, inter_weight, intra_weight, ignore_mask=None):
    """``(loss [], lse_s [N], lse_t [N], class_stats [5, C])`` float32, as ``torch_impl.logit.dist_fwd``
    (class_stats = (mu_s, mu_t, n = |a_hat|, m = |b_hat|, s = <a_hat, b_hat>) per class over the kept rows)."""
    _, lse_s, lse_t = kd_fwd_triton(student, teacher, temperature, None)
    student, teacher = _rows(student), _rows(teacher)
    n, c = student.shape
    dev = student.device
    cfg = _dist_config()
    keep = _keep(ignore_mask, n, dev)
    groups = max(1, min(DIST_MAX_GROUPS, triton.cdiv(n, cfg["BLOCK_R"])))
    rowstat = torch.zeros(3, n, device=dev, dtype=torch.float32)
    part = torch.empty(groups, 5, c, device=dev, dtype=torch.float32)
    cnt = torch.zeros(groups, device=dev, dtype=torch.float32)
    stats = torch.zeros(5, c, device=dev, dtype=torch.float32)
    inv_t = 1.0 / float(temperature)
    if n and c:
        _dist_fwd_kernel[(groups, triton.cdiv(c, cfg["BLOCK_C"]))](
            student, teacher, keep, lse_s, lse_t, rowstat, part, cnt, n, c, groups,
            student.stride(0), teacher.stride(0), inv_t, 1.0 / c, **cfg,
        )  # fmt: skip
        _dist_merge_kernel[(triton.cdiv(c, cfg["BLOCK_C"]),)](
            part, cnt, stats, c, groups, BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"], num_stages=1,
        )  # fmt: skip
    kept = keep.to(torch.bool)
    count = kept.sum().to(torch.float32)
    n2, m2, s = rowstat.unbind(0)
    r_row = torch.where(kept, s / (n2.sqrt() * m2.sqrt() + _DIST_EPS), 0.0)
    inter = 1.0 - r_row.sum() / count.clamp_min(1)
    _, _, n_c, m_c, c_st = stats.unbind(0)
    intra = 1.0 - (c_st / (n_c * m_c + _DIST_EPS)).mean()
    loss = float(temperature) ** 2 * (inter_weight * inter + intra_weight * intra) * (count > 0).to(torch.float32)
    return loss, lse_s, lse_t, stats


def dist_bwd_triton(grad, student, teacher, lse_s, lse_t, class_stats, temperature, inter_weight, intra_weight,
                    ignore_mask, need_student, need_teacher):  # fmt: skip
    """``(grad_student, grad_teacher)`` as ``torch_impl.logit.dist_bwd`` (the teacher's on the
    PyTorch path; an unneeded gradient is an empty tensor)."""
    from kd_kernels.torch_impl import logit as _impl

    gs = student.new_empty(0)
    if need_student:
        s, t = _rows(student), _rows(teacher)
        n, c = s.shape
        keep = _keep(ignore_mask, n, s.device)
        count = keep.sum().to(torch.float32)
        base = -(float(temperature) ** 2) * grad.to(torch.float32) * (count > 0).to(torch.float32)
        scales = torch.stack([base * inter_weight / count.clamp_min(1), base * (intra_weight / max(c, 1))])
        gs = torch.empty(n, c, device=s.device, dtype=student.dtype)
        if n and c:
            _dist_bwd_kernel[(n,)](
                s, t, keep, lse_s.float().contiguous(), lse_t.float().contiguous(),
                class_stats.float().contiguous(), scales.contiguous(), gs, c, s.stride(0), t.stride(0),
                1.0 / float(temperature), 1.0 / c, _DIST_EPS, _FP32_TINY,
                **{**_config(), "BLOCK_C": DIST_BWD_BLOCK_C["interpret" if TRITON_INTERPRET else "gpu"]},
            )  # fmt: skip
    gt = teacher.new_empty(0)
    if need_teacher:
        gt = _impl.dist_bwd(grad, student, teacher, lse_s, lse_t, class_stats, temperature, inter_weight,
                            intra_weight, ignore_mask, False, True)[1]  # fmt: skip
    return gs, gt


# ------------------------------------------------------------------------------------------
# GRKD (docs/logit.md section 9): one program per row walks the pair grid in [BLOCK_I, BLOCK_J]
# tiles (first classes a: 0..C-1, or the row's top_k teacher indices; second classes b: 0..C-1),
# pairs z_t,a > z_t,b, softplus(-(z_s,a - z_s,b) / T). Forward: per-row softplus sums and pair
# counts (the mean over pairs and kept rows is torch glue on [N] vectors); a NaN/+inf teacher
# logit makes no pair but must give a NaN row (the torch path's amax * 0 carrier). Backward:
# sigmoid(x) w per pair, summed over a into dz_b (+) and over b into dz_a (-), accumulated in an
# fp32 [N, C] buffer with relaxed atomics (each row is written by its own program only).
# ------------------------------------------------------------------------------------------

GRKD_CONFIGS = {
    "gpu": {"BLOCK_I": 16, "BLOCK_J": 128, "num_warps": 4, "num_stages": 1, "maxnreg": 255},
    "interpret": {"BLOCK_I": 16, "BLOCK_J": 64, "num_warps": 1, "num_stages": 1},
}


def _grkd_config() -> dict:
    return GRKD_CONFIGS["interpret" if TRITON_INTERPRET else "gpu"]


@triton.jit
def _log1p(e):
    # log(1 + e), accurate for tiny e (Goldberg): log(u) e / (u - 1) with u = fl(1 + e)
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _grkd_pairs(s_ptr, t_ptr, idx_ptr, r64, stride_s, stride_t, stride_i, i0, j0, K_I, C, inv_t,
                HAS_IDX: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):  # fmt: skip
    # one pair tile: first-class ids [BLOCK_I] (and their validity), x_ab [BLOCK_I, BLOCK_J], the pair mask
    oi = i0 + tl.arange(0, BLOCK_I)
    iin = oi < K_I
    if HAS_IDX:
        ci = tl.load(idx_ptr + r64 * stride_i + oi, mask=iin, other=0)
    else:
        ci = oi
    cj = j0 + tl.arange(0, BLOCK_J)
    jin = cj < C
    si = tl.load(s_ptr + r64 * stride_s + ci, mask=iin, other=0.0).to(tl.float32)
    ti = tl.load(t_ptr + r64 * stride_t + ci, mask=iin, other=0.0).to(tl.float32)
    sj = tl.load(s_ptr + r64 * stride_s + cj, mask=jin, other=0.0).to(tl.float32)
    tj = tl.load(t_ptr + r64 * stride_t + cj, mask=jin, other=0.0).to(tl.float32)
    x = (sj[None, :] - si[:, None]) * inv_t
    pm = (ti[:, None] > tj[None, :]) & iin[:, None] & jin[None, :]
    return ci, iin, cj, jin, x, pm


@triton.jit
def _grkd_fwd_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [N, C] teacher logits
    idx_ptr,  # [N, K_I] int64 top-k teacher indices (HAS_IDX) or unused
    sum_ptr,  # [N] fp32 out: sum over pairs of softplus(x_ab) (+ the NaN carrier)
    pairs_ptr,  # [N] int64 out: |P_i|
    C,  # classes
    K_I,  # first classes per row: top_k or C
    stride_s,  # student row stride
    stride_t,  # teacher row stride
    stride_i,  # index row stride
    inv_t,  # 1 / T
    HAS_IDX: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row = tl.program_id(0)
    r64 = tl.cast(row, tl.int64)
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_J], dtype=tl.int64)
    for i0 in range(0, K_I, BLOCK_I):
        for j0 in range(0, C, BLOCK_J):
            _, _, _, _, x, pm = _grkd_pairs(s_ptr, t_ptr, idx_ptr, r64, stride_s, stride_t, stride_i, i0, j0,
                                            K_I, C, inv_t, HAS_IDX, BLOCK_I, BLOCK_J)  # fmt: skip
            # softplus as torch: the identity above 20, else log1p(exp(x))
            sp = tl.where(x > 20.0, x, _log1p(tl.exp(tl.where(x > 20.0, 20.0, x))))  # NaN stays NaN
            acc += tl.sum(tl.where(pm, sp, 0.0), axis=0)
            cnt += tl.sum(pm.to(tl.int64), axis=0)
    # NaN carrier: amax(z_t) * 0 (NaN for a NaN or +inf teacher logit, or an all -inf row)
    mx = tl.full([BLOCK_J], float("-inf"), tl.float32)
    nan = tl.zeros([BLOCK_J], dtype=tl.int32)
    for j0 in range(0, C, BLOCK_J):
        cj = j0 + tl.arange(0, BLOCK_J)
        tj = tl.load(t_ptr + r64 * stride_t + cj, mask=cj < C, other=float("-inf")).to(tl.float32)
        mx = tl.where(tj > mx, tj, mx)
        nan = tl.maximum(nan, tl.where(tj <= float("inf"), 0, 1))  # 1 only for NaN
    amax = tl.where(tl.max(nan, axis=0) != 0, float("nan"), tl.max(mx, axis=0))
    tl.store(sum_ptr + row, tl.sum(acc, axis=0) + amax * 0.0)
    tl.store(pairs_ptr + row, tl.sum(cnt, axis=0))


@triton.jit
def _grkd_bwd_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [N, C] teacher logits
    idx_ptr,  # [N, K_I] int64 top-k teacher indices (HAS_IDX) or unused
    keep_ptr,  # [N] int8: 1 for rows that count
    w_ptr,  # [N] fp32: grad / (max(K, 1) max(|P_i|, 1) T)
    gs_ptr,  # [N, C] fp32 out (zeroed): dLoss/dz_s
    C,  # classes
    K_I,  # first classes per row: top_k or C
    stride_s,  # student row stride
    stride_t,  # teacher row stride
    stride_i,  # index row stride
    inv_t,  # 1 / T
    HAS_IDX: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row = tl.program_id(0)
    r64 = tl.cast(row, tl.int64)
    keep = tl.load(keep_ptr + row) != 0
    if keep:  # dropped rows keep their zeros (NaN there must not leak)
        w = tl.load(w_ptr + row)
        # b tiles outer: their sums stay in registers (one atomic per class b); the a side takes
        # C K_I / BLOCK_J atomic elements (not C K_I / BLOCK_I as with a tiles outer)
        for j0 in range(0, C, BLOCK_J):
            acc_j = tl.zeros([BLOCK_J], dtype=tl.float32)
            for i0 in range(0, K_I, BLOCK_I):
                ci, iin, _, _, x, pm = _grkd_pairs(s_ptr, t_ptr, idx_ptr, r64, stride_s, stride_t, stride_i, i0,
                                                   j0, K_I, C, inv_t, HAS_IDX, BLOCK_I, BLOCK_J)  # fmt: skip
                pg = tl.where(pm, tl.sigmoid(x) * w, 0.0)  # dL/dz_b per pair (dL/dz_a = -pg)
                tl.atomic_add(gs_ptr + r64 * C + ci, -tl.sum(pg, axis=1), mask=iin, sem="relaxed")
                acc_j += tl.sum(pg, axis=0)
            cj = j0 + tl.arange(0, BLOCK_J)
            tl.atomic_add(gs_ptr + r64 * C + cj, acc_j, mask=cj < C, sem="relaxed")


def _grkd_index(teacher, top_k):
    """``(idx [N, k] int64 or a dummy, k, has_idx)``: the first classes of the pair grid."""
    from kd_kernels.torch_impl import logit as _impl

    idx = _impl._grkd_top_idx(teacher, None if top_k is None else int(top_k))
    if idx is None:
        return teacher.new_zeros(1, dtype=torch.int64), teacher.shape[1], False
    return idx.contiguous(), idx.shape[1], True


def grkd_fwd_triton(student, teacher, temperature, top_k=None, ignore_mask=None):
    """``(loss [], pair_count [N] int64)`` as ``torch_impl.logit.grkd_fwd`` (loss float32)."""
    student, teacher = _rows(student), _rows(teacher)
    n, c = student.shape
    idx, k, has_idx = _grkd_index(teacher, top_k)
    row_sum = torch.zeros(n, device=student.device, dtype=torch.float32)
    pairs = torch.zeros(n, device=student.device, dtype=torch.int64)
    if n and c:
        _grkd_fwd_kernel[(n,)](
            student, teacher, idx, row_sum, pairs, c, k, student.stride(0), teacher.stride(0),
            idx.stride(0) if has_idx else 0, 1.0 / float(temperature), HAS_IDX=has_idx, **_grkd_config(),
        )  # fmt: skip
    keep = _keep(ignore_mask, n, student.device).to(torch.bool)
    rows = torch.where(keep, row_sum / pairs.clamp_min(1).to(torch.float32), 0.0)
    return rows.sum() / keep.sum().clamp_min(1).to(torch.float32), pairs


def grkd_bwd_triton(grad, student, teacher, pair_count, temperature, top_k=None, ignore_mask=None):
    """``grad_student`` as ``torch_impl.logit.grkd_bwd`` (the teacher gets no gradient)."""
    s, t = _rows(student), _rows(teacher)
    n, c = s.shape
    idx, k, has_idx = _grkd_index(t, top_k)
    keep = _keep(ignore_mask, n, s.device)
    count = keep.sum().clamp_min(1).to(torch.float32)
    w = grad.to(torch.float32) / (count * pair_count.clamp_min(1).to(torch.float32) * float(temperature))
    gs = torch.zeros(n, c, device=s.device, dtype=torch.float32)
    if n and c:
        _grkd_bwd_kernel[(n,)](
            s, t, idx, keep, w.contiguous(), gs, c, k, s.stride(0), t.stride(0),
            idx.stride(0) if has_idx else 0, 1.0 / float(temperature), HAS_IDX=has_idx, **_grkd_config(),
        )  # fmt: skip
    return gs.to(student.dtype)
