"""PyTorch path of the fused-linear KD / JSD losses: the LM head and the divergence in row chunks.

The logits ``z_s = h_s W_sᵀ + b_s`` ``[N, V]`` and ``z_t = h_t W_tᵀ + b_t`` are never materialised:
rows are processed in chunks of ``chunk_rows_for(V)`` rows (a chunk's logits have at most about
``CHUNK_ELEMENTS = 2**23`` elements), each chunk's logits come from one matmul per side, and the
row losses and their gradients from the divergence code of :mod:`kd_kernels.torch_impl.logit`
(:func:`divergence_fwd` / :func:`divergence_bwd`, not repeated here). The forward keeps only the
per-row log-sum-exps ``lse_s``, ``lse_t`` ``[N]`` for the backward, which recomputes the chunk
logits, gets ``G = dL/dz`` for the chunk and applies the head's chain rule::

    grad_h_s[chunk] = G_s W_s,   grad_W_s += G_sᵀ h_s[chunk],   grad_b_s += Σ_rows G_s

(the teacher side likewise, only when a teacher tensor needs a gradient).

Memory: O(N) saved (two log-sum-exps per row) plus O(V·H) for the weight gradients and a few
``chunk x V`` temporaries; never O(N·V).

FLOPs: the forward costs ``2·N·V·(Hs + Ht)`` for the two head GEMMs (plus O(N·V) for the
divergence). The backward recomputes both logits (another ``2·N·V·(Hs + Ht)``) and runs one more
GEMM of ``2·N·V·H`` per input that needs a gradient (hidden, weight; the bias is a row sum), so a
student-only backward costs ``2·N·V·(Hs + Ht) + 4·N·V·Hs``: the recomputation overhead is the
forward's GEMMs once more (``2·N·V·(Hs + Ht)``), the price of not storing ``[N, V]`` logits.

Bias convention: a bias is a ``[V]`` tensor or an empty tensor (``numel() == 0``) for no bias (the
ops take tensors, not optional tensors, so every gradient slot has a tensor to stand for).

Precision: the head GEMMs run in the inputs' dtype (tensor cores for fp16/bf16 on a GPU); the
divergence is computed in float32 (float64 if either side is float64), as the logit losses;
weight and bias gradients are accumulated over chunks in that compute dtype and returned in
each input's dtype.
"""

from __future__ import annotations

import torch

from kd_kernels.torch_impl.logit import chunk_rows_for, compute_dtype, divergence_bwd, divergence_fwd

__all__ = ["fused_linear_bwd", "fused_linear_fwd", "logits"]


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``hidden [n, H] @ weight [V, H]ᵀ (+ bias [V])`` -> ``[n, V]`` in the inputs' dtype (one GEMM)."""
    if bias.numel() == 0:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


def fused_linear_fwd(
    kind: str,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor,
    temperature: float,
    beta: float = 0.5,
    ignore_mask: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
):
    """Forward of the fused-linear ``kind`` ("kd" or "jsd") loss.

    Args: hidden ``[N, Hs]`` / ``[N, Ht]``, weights ``[V, Hs]`` / ``[V, Ht]``, biases ``[V]`` or
    empty; ``ignore_mask`` bool ``[N]`` (True = drop) or None; ``chunk_rows`` forces the chunk size.

    Returns ``(row_loss [N], lse_s [N], lse_t [N])`` exactly as :func:`divergence_fwd` on the
    full logits (kd's rows include T², dropped rows are 0), in the compute dtype.
    """
    n, v = student_hidden.shape[0], student_weight.shape[0]
    dtype = compute_dtype(student_hidden, teacher_hidden)
    row_loss = torch.empty(n, dtype=dtype, device=student_hidden.device)
    lse_s = torch.empty_like(row_loss)
    lse_t = torch.empty_like(row_loss)
    step = chunk_rows_for(v, chunk_rows)
    for a in range(0, n, step):
        b = min(a + step, n)
        zs = logits(student_hidden[a:b], student_weight, student_bias)
        zt = logits(teacher_hidden[a:b], teacher_weight, teacher_bias)
        mask = None if ignore_mask is None else ignore_mask[a:b]
        row_loss[a:b], lse_s[a:b], lse_t[a:b] = divergence_fwd(kind, zs, zt, temperature, beta, mask, chunk_rows=b - a)
    return row_loss, lse_s, lse_t


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _head_grads(g, hidden, weight, need_h, need_w, need_b, gh, gw, gb, a, b):
    """Chain rule of one chunk's ``G = dL/dz [n, V]`` through ``z = h Wᵀ + b`` into the outputs."""
    if need_h:
        gh[a:b] = (g @ weight.to(g.dtype)).to(gh.dtype)
    if need_w:
        gw.addmm_(g.t().to(gw.dtype), hidden[a:b].to(gw.dtype))
    if need_b:
        gb.add_(g.sum(0).to(gb.dtype))


def fused_linear_bwd(
    kind: str,
    grad_row: torch.Tensor,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    temperature: float,
    beta: float = 0.5,
    ignore_mask: torch.Tensor | None = None,
    needs: tuple[bool, bool, bool, bool, bool, bool] = (True, True, True, False, False, False),
    *,
    chunk_rows: int | None = None,
):
    """Backward of :func:`fused_linear_fwd` given ``grad_row`` = dLoss/d(row_loss) ``[N]``.

    ``needs`` = which of (student_hidden, student_weight, student_bias, teacher_hidden,
    teacher_weight, teacher_bias) need a gradient. Returns those six gradients, each in its
    input's shape and dtype, or an empty tensor where not needed (or the bias is empty).
    The logits of each chunk are recomputed (see the module docstring for the FLOP cost).
    """
    inputs = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    needs = tuple(bool(x) and t.numel() > 0 for x, t in zip(needs, inputs, strict=True))
    need_s, need_t = any(needs[:3]), any(needs[3:])
    n, v = student_hidden.shape[0], student_weight.shape[0]
    outs = []
    for i, (t, need) in enumerate(zip(inputs, needs, strict=True)):
        if not need:
            outs.append(t.new_empty(0))
        elif i % 3 == 0:  # hidden: written chunk by chunk
            outs.append(torch.empty_like(t))
        else:  # weight, bias: accumulated over chunks
            outs.append(torch.zeros(t.shape, dtype=_acc_dtype(t), device=t.device))
    if need_s or need_t:
        step = chunk_rows_for(v, chunk_rows)
        for a in range(0, n, step):
            b = min(a + step, n)
            zs = logits(student_hidden[a:b], student_weight, student_bias)
            zt = logits(teacher_hidden[a:b], teacher_weight, teacher_bias)
            mask = None if ignore_mask is None else ignore_mask[a:b]
            gs, gt = divergence_bwd(
                kind, grad_row[a:b], zs, zt, lse_s[a:b], lse_t[a:b], temperature, beta, mask, need_s, need_t,
                chunk_rows=b - a,
            )  # fmt: skip
            if need_s:
                _head_grads(gs, student_hidden, student_weight, *needs[:3], *outs[:3], a, b)
            if need_t:
                _head_grads(gt, teacher_hidden, teacher_weight, *needs[3:], *outs[3:], a, b)
    return tuple(o.to(t.dtype) for o, t in zip(outs, inputs, strict=True))
