"""Triton kernels of the divergences against an offline top-k teacher (``TopKTeacher``): kd,
reverse KL, generalised JSD and TVD. Math (the k + 1 buckets, both ``missing`` modes, the
backward ``dL/dz = [q_v (a_rest - S) + [v = idx_j] (G_j - a_rest q_j)] / T``): docs/logit.md
section 11 and the ``kd_kernels/torch_impl/topk.py`` docstring; the launchers here have the
arguments and outputs of that module's ``topk_fwd`` / ``topk_bwd`` (fp32 / fp16 / bf16; float64
is routed to the PyTorch path by ``kd_kernels/ops/_define.py``).

One program per block of BLOCK_R rows, the vocabulary streamed in [BLOCK_R, BLOCK_V] tiles (the
only O(V) read; no rows x vocabulary buffer besides the gradient itself):

- forward: (A) the teacher's normaliser over the k log-probabilities; (B) one pass over the
  vocabulary with lane-wise online log-sum-exp states of s = z / T over all classes (lse) and,
  where the loss needs q_rest, over the classes outside the k (lse_out, exact: no cancellation
  in 1 - sum_j q_j); (C) the k + 1 bucket summands from the student logits gathered at the
  indices in [BLOCK_R, BLOCK_K] tiles.
- backward: (A) as above; (C) S = sum_j G_j over the k + 1 buckets and a_rest from the saved
  lse / lse_out; (B) one pass over the vocabulary writing, in the student's dtype,
  ``w (q_v (a_rest - S) + sum_{j: idx_j = v} (G_j - a_rest q_j))`` with ``w = grad_row / T``.

Membership of a vocabulary tile in the row's k indices (pass B of both kernels): the launcher
sorts each row's indices (``torch.sort``, O(N k log k), the log-probabilities permuted along;
the losses do not depend on the order). Each row keeps a cursor into its sorted list; in a tile
[v0, v0 + BLOCK_V) the entries below v0 + BLOCK_V are consumed one per iteration of a loop that
runs while any row of the block still has one there, each with one [BLOCK_R, BLOCK_V] compare.
So a row costs O(V + k BLOCK_V) compares, not O(V k), and the backward adds the k terms inside
the same pass that writes the dense part: every gradient element is written once, by its own
program, with one rounding (no scatter, no atomics, no barrier). Duplicate indices in a row
follow torch_impl/topk.py: each copy is its own bucket (the per-index terms add up, as
scatter_add_ there), and the class leaves the rest bucket once (as the scatter of -inf).

Deviation: an index outside [0, V) (not checked on the host: it would read tensor values)
gives a NaN row loss and gradient instead of the PyTorch path's indexing error; no memory
outside the row is read or written.
Non-finite logits follow the torch path: NaN / +inf in a kept row gives NaN; -inf is a class
of probability 0 (0 log 0 = 0); dropped rows (ignore_mask) get 0 loss and 0 gradient.
No tl.dot: memory-bound streaming, fp32 arithmetic for every input dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kd_kernels._backend import TRITON_INTERPRET

# online log-sum-exp rescale and log M of the dense divergence kernels (one definition)
from kd_kernels.triton.logit import _log1p, _log_mix, _rescale

__all__ = ["TOPK_CONFIGS", "topk_bwd_triton", "topk_fwd_triton"]

# Launch configuration (forward and backward share it). A program's tile holds TILE elements:
# BLOCK_V = next_pow2(V) clamped to [MIN_BLOCK_V, MAX_BLOCK_V], BLOCK_R = TILE // BLOCK_V rows
# (at most MAX_BLOCK_R), so a large vocabulary gets one row per program and a small one several.
# gpu: 4 warps stream 2048 columns (16 per thread) per step as the dense KD kernels do; 16 rows
#   at most, so the [BLOCK_R, BLOCK_K] gathers stay at 512 elements; BLOCK_K = 32 covers the
#   usual k <= 20 of vLLM / SGLang in one chunk. maxnreg=255: as the dense kernels, room for
#   the four lane-wise log-sum-exp states without spills (compile gate).
# interpret: small tiles so that the tests' odd vocabularies span several tiles, several rows
#   share a program, and k spans several BLOCK_K chunks.
TOPK_CONFIGS = {
    "gpu": {
        "TILE": 2048, "MIN_BLOCK_V": 16, "MAX_BLOCK_V": 2048, "MAX_BLOCK_R": 16, "BLOCK_K": 32,
        "num_warps": 4, "num_stages": 1, "maxnreg": 255,
    },
    "interpret": {
        "TILE": 32, "MIN_BLOCK_V": 4, "MAX_BLOCK_V": 16, "MAX_BLOCK_R": 4, "BLOCK_K": 4,
        "num_warps": 1, "num_stages": 1,
    },
}  # fmt: skip

# divergence kind -> the MODE constexpr (after JSD's endpoint rule: beta 0 / 1 are forward /
# reverse KL, torch_impl.logit._jsd_mode)
_MODES = {"kd": 0, "forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}
# past every valid index: a cursor at the end of its row's list
_END = tl.constexpr(2**62)


def _launch(n: int, v: int) -> tuple[dict, dict, int]:
    """``(constexprs, launch options, programs)`` for ``n`` rows of ``v`` classes."""
    cfg = TOPK_CONFIGS["interpret" if TRITON_INTERPRET else "gpu"]
    block_v = min(max(triton.next_power_of_2(v), cfg["MIN_BLOCK_V"]), cfg["MAX_BLOCK_V"])
    block_r = max(1, min(cfg["MAX_BLOCK_R"], cfg["TILE"] // block_v))
    meta = {"BLOCK_R": block_r, "BLOCK_V": block_v, "BLOCK_K": cfg["BLOCK_K"]}
    opts = {k: cfg[k] for k in ("num_warps", "num_stages", "maxnreg") if k in cfg}
    return meta, opts, triton.cdiv(n, block_r)


# ------------------------------------------------------------------------------------------
# Per-bucket math (docs/logit.md section 11), elementwise on [BLOCK_R, BLOCK_K] or [BLOCK_R]
# tensors of ls = log q and lt = log p of one bucket each:
#   MODE 0 kd / forward KL:  p (lt - ls)                         G = -c p,          a = -c p / q
#   MODE 1 reverse KL:       q (ls - lt)                         G = q (ls - lt + 1), a = ls - lt + 1
#   MODE 2 JSD(b):           b p (lt - lM) + (1-b) q (ls - lM)   G = q d, a = d = (1-b)(ls - lM)
#   MODE 3 TVD:              |p - q| / 2                         G = q d, a = d = sign(q - p) / 2
# with lM = log(b p + (1-b) q), 0 log 0 = 0 (a term whose probability is 0 is 0), G = q dL/dq,
# a = dL/dq; kd's c = T^2 multiplies the row sum (forward) and G, a (backward).
# ------------------------------------------------------------------------------------------


@triton.jit
def _bucket_loss(ls, lt, beta, log_b, log_1mb, MODE: tl.constexpr):
    # one bucket's summand of the row divergence (kd without its c)
    q = tl.exp(ls)
    p = tl.exp(lt)
    if MODE == 0:
        out = tl.where(p == 0.0, 0.0, p * (lt - ls))
    elif MODE == 1:
        out = tl.where(q == 0.0, 0.0, q * (ls - lt))
    elif MODE == 2:
        lm = _log_mix(ls, lt, log_b, log_1mb)
        out = beta * tl.where(p == 0.0, 0.0, p * (lt - lm)) + (1.0 - beta) * tl.where(q == 0.0, 0.0, q * (ls - lm))
    else:
        out = 0.5 * tl.abs(p - q)
    return out


@triton.jit
def _bucket_grad(ls, lt, c, one_m_beta, log_b, log_1mb, MODE: tl.constexpr):
    # (G, a) of one bucket: G = q dL/dq, a = dL/dq (a unmasked: the caller zeroes a_rest where
    # q_rest = 0, or p_rest = 0 for kd, as torch_impl.topk._bucket_grads)
    q = tl.exp(ls)
    p = tl.exp(lt)
    if MODE == 0:
        g = -c * p
        a = g / q
    else:
        if MODE == 1:
            d = ls - lt + 1.0
        elif MODE == 2:
            d = one_m_beta * (ls - _log_mix(ls, lt, log_b, log_1mb))
        else:
            d = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))  # sign(0) = 0
            d = tl.where(tl.abs(q - p) >= 0.0, d, q + p)  # a NaN q or p keeps d NaN (torch.sign)
        if MODE == 3:
            g = q * d
        else:
            g = tl.where(q == 0.0, 0.0, q * d)  # _plog: q = 0 gives 0 even where d is inf / NaN
        a = d
    return g, a


@triton.jit
def _teacher_norm(lp_ptr, k_rows, rin, K, RENORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # (shift [BLOCK_R], lt_rest [BLOCK_R]) with lt_j = lp_j - shift:
    #   RENORM (missing="renormalize", or "rest" with k = V): shift = logsumexp_j lp_j, lt_rest = -inf
    #   else ("rest", k < V):  shift = 0, lt_rest = log(1 - min(1, sum_j exp(lp_j)))
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        kin = rin[:, None] & (ok < K)[None, :]
        lp = tl.load(lp_ptr + k_rows[:, None] + ok[None, :], mask=kin, other=float("-inf")).to(tl.float32)
        if RENORM:  # online log-sum-exp (a NaN leaves m alone but makes acc NaN: it propagates)
            cm = tl.max(lp, axis=1)
            m_new = tl.where(cm > m, cm, m)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * _rescale(m, m_new) + tl.sum(tl.exp(lp - safe[:, None]), axis=1)
            m = m_new
        else:
            acc += tl.sum(tl.exp(lp), axis=1)
    if RENORM:
        shift = m + tl.log(acc)  # -inf for a row of -inf log-probabilities (then NaN, as torch)
        lt_rest = tl.full([BLOCK_R], float("-inf"), tl.float32)
    else:
        shift = tl.zeros([BLOCK_R], dtype=tl.float32)
        mass = tl.where(acc > 1.0, 1.0, acc)  # clamp(max=1), NaN kept
        lt_rest = _log1p(-mass)
    return shift, lt_rest


@triton.jit
def _lse_merge(m, s):
    # the row log-sum-exp [BLOCK_R] of lane-wise states (m, s) [BLOCK_R, BLOCK_V]; -inf when empty
    g = tl.max(m, axis=1)
    return g + tl.log(tl.sum(s * _rescale(m, g[:, None]), axis=1))


@triton.jit
def _lse_step(m, s, u):
    # one lane-wise online log-sum-exp step with the tile u (exp(m_old - m_new) rescale, 0 for an
    # empty state: never -inf - -inf)
    m_new = tl.where(u > m, u, m)
    s = s * _rescale(m, m_new) + tl.exp(u - tl.where(m_new == float("-inf"), 0.0, m_new))
    return m_new, s


@triton.jit
def _topk_fwd_kernel(
    s_ptr,  # [N, V] student logits (row stride stride_s, unit column stride)
    idx_ptr,  # [N, K] int64 teacher class ids, each row sorted ascending (contiguous)
    lp_ptr,  # [N, K] teacher log-probabilities in the order of idx (contiguous; fp32 / fp16 / bf16)
    keep_ptr,  # [N] int8: 1 for rows that count
    row_ptr,  # [N] fp32 out: the row divergence over the k + 1 buckets (0 for dropped rows)
    lse_ptr,  # [N] fp32 out: logsumexp(z / T) over the V classes
    lse_out_ptr,  # [N] fp32 out: logsumexp(z / T) outside the k classes (-inf when not NEED_REST)
    N,  # rows
    V,  # classes
    K,  # teacher entries per row (1 <= K <= V)
    stride_s,  # student row stride
    inv_t,  # 1 / T
    c,  # kd: T^2, forward KL (JSD beta = 0): 1; unused otherwise
    beta,  # JSD's b (MODE 2)
    log_b,  # log b (MODE 2)
    log_1mb,  # log(1 - b) (MODE 2)
    MODE: tl.constexpr,  # 0 kd / forward KL, 1 reverse KL, 2 JSD, 3 TVD
    RENORM: tl.constexpr,  # teacher renormalised over the k (p_rest = 0), else the "rest" bucket
    NEED_REST: tl.constexpr,  # the loss reads q_rest (every case but kd / forward KL with RENORM)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
    BLOCK_K: tl.constexpr,  # teacher entries per gather chunk
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rin = rows < N
    r64 = rows.to(tl.int64)
    s_rows = s_ptr + r64 * stride_s
    k_rows = r64 * K
    shift, lt_rest = _teacher_norm(lp_ptr, k_rows, rin, K, RENORM, BLOCK_R, BLOCK_K)

    # (B) lse over all classes and lse_out outside the k: lane-wise online states, one read of z
    m_a = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
    s_a = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)
    m_o = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
    s_o = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)
    jp = tl.zeros([BLOCK_R], dtype=tl.int32)  # cursor into the row's sorted indices
    cur = tl.load(idx_ptr + k_rows, mask=rin, other=_END)  # the index at the cursor (_END: none left)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inb = rin[:, None] & (offs < V)[None, :]
        u = tl.load(s_rows[:, None] + offs[None, :], mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        m_a, s_a = _lse_step(m_a, s_a, u)
        if NEED_REST:
            # the k classes in this tile: consume every cursor entry below v0 + BLOCK_V
            hole = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.int1)
            end = v0 + BLOCK_V
            hit = cur < end
            while tl.max(hit.to(tl.int32), axis=0) > 0:
                c32 = tl.where(hit & (cur >= 0), cur, -1).to(tl.int32)  # (an index < 0 matches nothing)
                hole = hole | (offs[None, :] == c32[:, None])
                jp += hit.to(tl.int32)
                cur = tl.load(idx_ptr + k_rows + jp, mask=rin & (jp < K), other=_END)
                hit = cur < end
            m_o, s_o = _lse_step(m_o, s_o, tl.where(hole, float("-inf"), u))
    lse = _lse_merge(m_a, s_a)
    if NEED_REST:
        lse_out = _lse_merge(m_o, s_o)
    else:
        lse_out = tl.full([BLOCK_R], float("-inf"), tl.float32)

    # (C) the k + 1 buckets: ls_j = z_idx_j / T - lse, lt_j = lp_j - shift; the rest bucket
    # ls_rest = lse_out - lse, lt_rest
    acc = _bucket_loss(lse_out - lse, lt_rest, beta, log_b, log_1mb, MODE)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        kin = rin[:, None] & (ok < K)[None, :]
        idx = tl.load(idx_ptr + k_rows[:, None] + ok[None, :], mask=kin, other=0)
        valid = kin & (idx >= 0) & (idx < V)
        # an index outside [0, V) reads nothing and makes the row NaN
        z = tl.load(s_rows[:, None] + tl.where(valid, idx, 0), mask=valid, other=float("nan")).to(tl.float32)
        ls = z * inv_t - lse[:, None]
        lt = tl.load(lp_ptr + k_rows[:, None] + ok[None, :], mask=kin, other=float("-inf")).to(tl.float32)
        lt = lt - shift[:, None]
        acc += tl.sum(tl.where(kin, _bucket_loss(ls, lt, beta, log_b, log_1mb, MODE), 0.0), axis=1)
    if MODE == 0:
        acc = acc * c
    keep = tl.load(keep_ptr + rows, mask=rin, other=0) != 0
    tl.store(row_ptr + rows, tl.where(keep, acc, 0.0), mask=rin)
    tl.store(lse_ptr + rows, lse, mask=rin)
    tl.store(lse_out_ptr + rows, lse_out, mask=rin)


@triton.jit
def _topk_bwd_kernel(
    w_ptr,  # [N] fp32: dLoss/d(row_loss) / T (0 for dropped rows)
    s_ptr,  # [N, V] student logits (row stride stride_s, unit column stride)
    idx_ptr,  # [N, K] int64 teacher class ids, each row sorted ascending (contiguous)
    lp_ptr,  # [N, K] teacher log-probabilities in the order of idx (contiguous)
    lse_ptr,  # [N] fp32 saved logsumexp(z / T)
    lse_out_ptr,  # [N] fp32 saved logsumexp(z / T) outside the k (-inf when not needed)
    gs_ptr,  # [N, V] out: dLoss/dz (student dtype, contiguous)
    N,  # rows
    V,  # classes
    K,  # teacher entries per row
    stride_s,  # student row stride
    inv_t,  # 1 / T
    c,  # kd: T^2, forward KL: 1; unused otherwise
    one_m_beta,  # 1 - b (MODE 2)
    log_b,  # log b (MODE 2)
    log_1mb,  # log(1 - b) (MODE 2)
    MODE: tl.constexpr,  # 0 kd / forward KL, 1 reverse KL, 2 JSD, 3 TVD
    RENORM: tl.constexpr,  # teacher renormalised over the k, else the "rest" bucket
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
    BLOCK_K: tl.constexpr,  # teacher entries per gather chunk
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rin = rows < N
    r64 = rows.to(tl.int64)
    s_rows = s_ptr + r64 * stride_s
    k_rows = r64 * K
    w = tl.load(w_ptr + rows, mask=rin, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rin, other=0.0)
    lse_out = tl.load(lse_out_ptr + rows, mask=rin, other=float("-inf"))
    shift, lt_rest = _teacher_norm(lp_ptr, k_rows, rin, K, RENORM, BLOCK_R, BLOCK_K)

    # (C) the rest bucket's a_rest and S = sum_j G_j over the k + 1 buckets
    ls_r = lse_out - lse
    g_sum, a_rest = _bucket_grad(ls_r, lt_rest, c, one_m_beta, log_b, log_1mb, MODE)
    if MODE == 0:
        a_rest = tl.where(tl.exp(lt_rest) == 0.0, 0.0, a_rest)  # p_rest = 0: no rest term
    else:
        a_rest = tl.where(tl.exp(ls_r) == 0.0, 0.0, a_rest)  # q_rest = 0: dq_rest/dz = 0
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        kin = rin[:, None] & (ok < K)[None, :]
        idx = tl.load(idx_ptr + k_rows[:, None] + ok[None, :], mask=kin, other=0)
        valid = kin & (idx >= 0) & (idx < V)
        # an index outside [0, V) reads nothing and makes the row NaN
        z = tl.load(s_rows[:, None] + tl.where(valid, idx, 0), mask=valid, other=float("nan")).to(tl.float32)
        lt = tl.load(lp_ptr + k_rows[:, None] + ok[None, :], mask=kin, other=float("-inf")).to(tl.float32)
        g, _ = _bucket_grad(z * inv_t - lse[:, None], lt - shift[:, None], c, one_m_beta, log_b, log_1mb, MODE)
        g_sum += tl.sum(tl.where(kin, g, 0.0), axis=1)
    row_scalar = (a_rest - g_sum) * w

    # (B) w (q_v (a_rest - S) + sum_{j: idx_j = v} (G_j - a_rest q_j)), one write per element
    jp = tl.zeros([BLOCK_R], dtype=tl.int32)
    cur = tl.load(idx_ptr + k_rows, mask=rin, other=_END)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inb = rin[:, None] & (offs < V)[None, :]
        u = tl.load(s_rows[:, None] + offs[None, :], mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        out = tl.exp(u - lse[:, None]) * row_scalar[:, None]
        end = v0 + BLOCK_V
        hit = cur < end
        while tl.max(hit.to(tl.int32), axis=0) > 0:
            # the entry at the cursor: its term from the gathered logit and log-probability
            valid = hit & (cur >= 0) & (cur < V)
            zj = tl.load(s_rows + tl.where(valid, cur, 0), mask=valid, other=0.0).to(tl.float32)
            lsj = zj * inv_t - lse
            ltj = tl.load(lp_ptr + k_rows + jp, mask=hit, other=float("-inf")).to(tl.float32) - shift
            gj, _ = _bucket_grad(lsj, ltj, c, one_m_beta, log_b, log_1mb, MODE)
            term = (gj - a_rest * tl.exp(lsj)) * w
            c32 = tl.where(valid, cur, -1).to(tl.int32)  # -1 matches no class
            out += tl.where(offs[None, :] == c32[:, None], term[:, None], 0.0)
            jp += hit.to(tl.int32)
            cur = tl.load(idx_ptr + k_rows + jp, mask=rin & (jp < K), other=_END)
            hit = cur < end
        out = tl.where(w[:, None] == 0.0, 0.0, out)  # dropped rows: 0 even where the row is NaN/inf
        tl.store(gs_ptr + r64[:, None] * V + offs[None, :], out.to(gs_ptr.dtype.element_ty), mask=inb)


# ------------------------------------------------------------------------------------------
# launchers (the arguments and outputs of torch_impl.topk.topk_fwd / topk_bwd)
# ------------------------------------------------------------------------------------------


def _prepare(student, indices, logprobs, kind, rest, beta):
    """Row-contiguous student, row-sorted ``(indices, logprobs)``, the mode and its flags."""
    from kd_kernels.torch_impl.logit import _jsd_mode

    mode = _jsd_mode(kind, float(beta))
    if mode not in _MODES:
        raise ValueError(f"topk_fwd_triton: unknown divergence kind {kind!r}")
    s = student if student.stride(-1) == 1 else student.contiguous()
    idx, lp = indices.contiguous(), logprobs.contiguous()
    if idx.shape[1] > 1:  # pass B walks each row's indices in ascending order
        idx, perm = torch.sort(idx, dim=1)
        lp = lp.gather(1, perm)
    v = s.shape[1]
    renorm = not (rest and idx.shape[1] < v)  # "rest" with k = V: the rest bucket is empty
    need_rest = rest or mode not in ("kd", "forward_kl")
    return s, idx, lp, mode, renorm, need_rest


def _scalars(mode: str, beta: float, temperature: float) -> tuple[float, float, float]:
    """``(c, log b, log(1 - b))``: kd's T^2 (1 for forward KL) and JSD's logs (0 elsewhere)."""
    c = float(temperature) ** 2 if mode == "kd" else 1.0
    if mode == "jsd":
        return c, math.log(beta), math.log1p(-beta)
    return c, 0.0, 0.0


def topk_fwd_triton(student, indices, logprobs, kind, rest, beta, temperature, ignore_mask=None):
    """``(row_loss [N], lse_s [N], lse_out [N])`` float32, as ``torch_impl.topk.topk_fwd``.

    ``student [N, V]`` logits; ``indices [N, k]`` int64 and ``logprobs [N, k]`` the teacher;
    ``kind`` in ``"kd" | "reverse_kl" | "jsd" | "tvd"`` (``beta`` read for jsd), ``rest`` for
    ``missing="rest"``; ``lse_out`` is ``-inf`` where the loss does not need it.
    """
    beta = float(beta)
    s, idx, lp, mode, renorm, need_rest = _prepare(student, indices, logprobs, kind, rest, beta)
    n, v = s.shape
    k = idx.shape[1]
    c, log_b, log_1mb = _scalars(mode, beta, temperature)
    row, lse, lse_out = (torch.empty(n, device=s.device, dtype=torch.float32) for _ in range(3))
    if ignore_mask is None:
        keep = torch.ones(n, dtype=torch.int8, device=s.device)
    else:
        keep = (~ignore_mask.to(torch.bool)).to(torch.int8)
    meta, opts, grid = _launch(n, v)
    _topk_fwd_kernel[(grid,)](
        s, idx, lp, keep, row, lse, lse_out, n, v, k, s.stride(0), 1.0 / float(temperature), c, beta,
        log_b, log_1mb, MODE=_MODES[mode], RENORM=renorm, NEED_REST=need_rest, **meta, **opts,
    )  # fmt: skip
    return row, lse, lse_out


def topk_bwd_triton(grad_row, student, indices, logprobs, lse_s, lse_out, kind, rest, beta, temperature,
                    ignore_mask=None):  # fmt: skip
    """Student gradient ``[N, V]`` in the student's dtype, as ``torch_impl.topk.topk_bwd``
    (``grad_row = dLoss/d row_loss [N]``; 0 on dropped rows)."""
    beta = float(beta)
    s, idx, lp, mode, renorm, _ = _prepare(student, indices, logprobs, kind, rest, beta)
    n, v = s.shape
    c, log_b, log_1mb = _scalars(mode, beta, temperature)
    w = grad_row.to(torch.float32) / float(temperature)
    if ignore_mask is not None:
        w = torch.where(ignore_mask.to(torch.bool), 0.0, w)
    gs = torch.empty(n, v, device=s.device, dtype=student.dtype)
    meta, opts, grid = _launch(n, v)
    _topk_bwd_kernel[(grid,)](
        w.contiguous(), s, idx, lp, lse_s.float().contiguous(), lse_out.float().contiguous(), gs, n, v,
        idx.shape[1], s.stride(0), 1.0 / float(temperature), c, 1.0 - beta, log_b, log_1mb,
        MODE=_MODES[mode], RENORM=renorm, **meta, **opts,
    )  # fmt: skip
    return gs
