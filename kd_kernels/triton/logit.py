"""Triton kernels of Hinton KD (``kd_loss``), reverse KL (``reverse_kl_loss``) and TVD
(``tvd_loss``); math: docs/logit.md sections 3, 4 and 6. Forward and student backward, one program per row, the vocabulary
streamed in tiles (no rows x vocab buffer).

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

import torch
import triton
import triton.language as tl

from kd_kernels._backend import TRITON_INTERPRET

__all__ = [
    "KD_CONFIGS",
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


def reverse_kl_bwd_triton(grad_row, student, teacher, lse_s, lse_t, temperature, ignore_mask, need_student, need_teacher):
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
