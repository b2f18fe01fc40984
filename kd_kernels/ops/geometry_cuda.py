"""CUDA C++ backend of the feature-geometry losses (gram, CKA, relation, Procrustes); math in
docs/geometry.md and the module docstring of kd_kernels/torch_impl/geometry.py.

Launchers ``{gram,cka,relation,procrustes}_{fwd,bwd}_cuda`` implement the op contracts of
kd_kernels/ops/geometry.py with the signatures, outputs and saved layouts of the Triton launchers
(kd_kernels/triton/geometry.py). The D x D epilogue logic is not repeated here: gram / CKA /
relation call that module's ``_dd_forward`` / ``_dd_backward`` with ``prims=CUDA_PRIMS``, the
streaming primitives of csrc/cuda/geometry.cu (kd_kernels._C, WMMA tensor-core tiles):

- ``geometry_products_cuda``: XᵀWX, XᵀWY, YᵀWY, column sums, kept-row count in one pass
  (split-K over N, relaxed fp32 atomics), the mask / shift / row scaling in the tile loads;
- ``geometry_grad_cuda``: dX = W[(X − 1μᵀ)P + (Y − 1μ_yᵀ)Q] in one streaming GEMM pass;
- ``geometry_row_sq_cuda``: w_i ‖x_i − μ‖² (relation's row norms, unbiased CKA's ρ).

Each takes ``precision`` ("tf32x3" | "tf32", docs/precision.md) from ``cuda_function(...,
precision=True)``. Inputs are float32 / float16 / bfloat16 (float64 goes to the torch path in
kd_kernels/ops/_define.py).

N x N form (N <= max(Ds, Dt)) of gram / CKA / relation: the torch path for now, as the Triton
launchers (the saved layout is then the torch path's N x N one).

Procrustes (no Triton Procrustes helper exists yet to share): the forward is the products pass
(X̃ᵀỸ and the Frobenius scales from the traces of the rank-1-corrected XᵀWX, YᵀWY) and the torch
path's polar factor (torch_impl._polar_gram / _polar_svd on the small Ds x Dt matrix). Backward
(torch_impl.procrustes_backward's formula) G = W Ỹ (k' Πᵀ) is one one-sided GEMM pass; the
projection G − [s_x > EPS](⟨G, X̃⟩ / s_x²) X̃ runs as torch ops on [B, N, D] ("Left": ⟨G, X̃⟩ =
k' ⟨X̃ᵀỸ, Π⟩ would need X̃ᵀỸ, which the saved layout does not hold). The products pass also forms
XᵀWX and YᵀWY although only their traces are used ("Left": a cross-product-only variant).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kd_kernels.ops._define import cuda_function
from kd_kernels.torch_impl import geometry as _torch
from kd_kernels.triton import geometry as _tg

__all__ = [
    "CUDA_PRIMS",
    "cka_bwd_cuda",
    "cka_fwd_cuda",
    "gram_bwd_cuda",
    "gram_fwd_cuda",
    "procrustes_bwd_cuda",
    "procrustes_fwd_cuda",
    "relation_bwd_cuda",
    "relation_fwd_cuda",
]

EPS = _torch.EPS
FROB, ROW, NONE = _torch.FROB, _torch.ROW, _torch.NONE

_c_products = cuda_function("geometry_products_cuda", precision=True)
_c_grad = cuda_function("geometry_grad_cuda", precision=True)
_c_row_sq = cuda_function("geometry_row_sq_cuda")


class GeometryPrims(NamedTuple):
    """The streaming primitives ``_dd_forward`` / ``_dd_backward`` take as ``prims`` (that order)."""

    products: Callable
    grad_gemm: Callable
    row_sq: Callable


def _none(t, like):
    """An optional tensor for the C++ side: an empty fp32 tensor stands for None."""
    return like.new_empty(0, dtype=torch.float32) if t is None else t


def _products(x, y, w, rinv_x, rinv_y, shift=None):
    """``kd_kernels.triton.geometry._products`` on the CUDA C++ kernel: XᵀWX, XᵀWY, YᵀWY, Σ w x',
    Σ w y' (x' = (x − c_x) · rinv_x, each factor when given), Σ w; fp32."""
    sx, sy = (None, None) if shift is None else shift
    return tuple(_c_products(x, y, _none(w, x), _none(rinv_x, x), _none(rinv_y, x), _none(sx, x), _none(sy, x)))


def _grad_gemm(a, v, w, ra, rv, p, q, mu, out_dtype):
    """``kd_kernels.triton.geometry._grad_gemm`` on the CUDA C++ kernel: W ((A − 1μ_aᵀ) P + (V − 1μ_vᵀ) Q)
    [B, N, Dout] in ``out_dtype`` (rows of A, V times ra, rv when given; mu = (μ_a, μ_v) or None)."""
    mu_a, mu_v = (None, None) if mu is None else mu
    out_f32 = out_dtype != a.dtype  # the kernel writes fp32 or a's dtype; any other dtype is a cast of fp32
    out = _c_grad(a, v, _none(w, a), _none(ra, a), _none(rv, a), p, q, _none(mu_a, a), _none(mu_v, a), out_f32)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _row_sq(x, w, mu):
    """``kd_kernels.triton.geometry._row_sq`` on the CUDA C++ kernel: w_i ‖x_i − μ‖² [B, N] fp32."""
    return _c_row_sq(x, _none(w, x), _none(mu, x))


CUDA_PRIMS = GeometryPrims(_products, _grad_gemm, _row_sq)


# --------------------------------------------------------------------------- op contracts


def gram_fwd_cuda(student, teacher, mask, center: bool, normalize: bool):
    if not _tg._use_dd(student, teacher):  # N x N form: the torch path for now
        loss, saved = _torch.gram_forward(student, teacher, mask, center, normalize)
    else:
        norm = FROB if normalize else NONE
        loss, saved = _tg._dd_forward("gram", student, teacher, mask, center, norm, False, prims=CUDA_PRIMS)
    return (loss, *saved)


def gram_bwd_cuda(grad, student, teacher, mask, *rest):
    saved, (center, normalize, need_x, need_y) = tuple(rest[:8]), rest[8:]
    if not _tg._use_dd(student, teacher):
        return _torch.gram_backward(grad, student, teacher, mask, saved, center, normalize, need_x, need_y)
    norm = FROB if normalize else NONE
    return _tg._dd_backward(
        "gram", grad, student, teacher, mask, saved, center, norm, False, need_x, need_y, prims=CUDA_PRIMS
    )


def cka_fwd_cuda(student, teacher, mask, unbiased: bool):
    if not _tg._use_dd(student, teacher):
        loss, saved = _torch.cka_forward(student, teacher, mask, unbiased)
    else:
        loss, saved = _tg._dd_forward("cka", student, teacher, mask, True, FROB, unbiased, prims=CUDA_PRIMS)
    return (loss, *saved)


def cka_bwd_cuda(grad, student, teacher, mask, *rest):
    saved, (unbiased, need_x, need_y) = tuple(rest[:8]), rest[8:]
    if not _tg._use_dd(student, teacher):
        return _torch.cka_backward(grad, student, teacher, mask, saved, unbiased, need_x, need_y)
    return _tg._dd_backward(
        "cka", grad, student, teacher, mask, saved, True, FROB, unbiased, need_x, need_y, prims=CUDA_PRIMS
    )


def relation_fwd_cuda(student, teacher, mask):
    if not _tg._use_dd(student, teacher):
        loss, saved = _torch.relation_forward(student, teacher, mask)
    else:
        loss, saved = _tg._dd_forward("relation", student, teacher, mask, False, ROW, False, prims=CUDA_PRIMS)
    return (loss, *saved)


def relation_bwd_cuda(grad, student, teacher, mask, *rest):
    saved, (need_x, need_y) = tuple(rest[:8]), rest[8:]
    if not _tg._use_dd(student, teacher):
        return _torch.relation_backward(grad, student, teacher, mask, saved, need_x, need_y)
    return _tg._dd_backward(
        "relation", grad, student, teacher, mask, saved, False, ROW, False, need_x, need_y, prims=CUDA_PRIMS
    )


# Procrustes forward (D x D products for every N: M is always Ds x Dt). With the products P of the
# shifted rows x' = x − c (c = a kept row for fp32 with centring, as _dd_forward; else c = 0) and
# δ = Σ w x' / n:  X̃ᵀỸ = P_xy − n δ_x δ_yᵀ,  ‖X̃‖²_F = tr P_xx − n ‖δ_x‖²,  μ = c + δ.
def procrustes_fwd_cuda(student, teacher, mask, center: bool):
    x, y, w = _tg._views(student, teacher, mask)
    shift = _tg._shifts(x, y, w) if center and x.dtype == torch.float32 else None
    mxx, mxy, myy, csx, csy, cnt = _products(x, y, w, None, None, shift)
    tr_x = mxx.diagonal(dim1=1, dim2=2).sum(dim=1)
    tr_y = myy.diagonal(dim1=1, dim2=2).sum(dim=1)
    mu_x = mu_y = x.new_empty(0, dtype=torch.float32)
    if center:
        d_x, d_y = csx / cnt[:, None], csy / cnt[:, None]  # 0/0 = NaN for an item without kept rows
        mu_x, mu_y = (d_x, d_y) if shift is None else (shift[0] + d_x, shift[1] + d_y)
        mxy = mxy - cnt[:, None, None] * d_x[:, :, None] * d_y[:, None, :]
        tr_x = tr_x - cnt * d_x.square().sum(dim=1)
        tr_y = tr_y - cnt * d_y.square().sum(dim=1)
    s_x = tr_x.clamp_min(0).sqrt().clamp_min(EPS)
    s_y = tr_y.clamp_min(0).sqrt().clamp_min(EPS)
    m = mxy / (s_x * s_y)[:, None, None]
    # the torch path's polar factor and its non-finite rule (torch_impl.procrustes_forward)
    bad = ~torch.isfinite(m).all(dim=(1, 2))
    m = torch.where(bad[:, None, None], 0.0, m)
    try:
        nuc, polar = _torch._polar_gram(m) if _torch.use_gram_eigh(m) else _torch._polar_svd(m)
    except torch.linalg.LinAlgError as err:  # finite but did not converge (not seen in practice)
        raise RuntimeError(f"procrustes_loss: the SVD of X̄ᵀȲ did not converge: {err}") from None
    polar = torch.where(bad[:, None, None], torch.nan, polar)
    loss = (2 - 2 * torch.where(bad, torch.nan, nuc)).mean().to(student.dtype)
    return loss, mu_x, s_x, mu_y, s_y, polar


def procrustes_bwd_cuda(grad, student, teacher, mask, mu_x, s_x, mu_y, s_y, polar, center, need_x, need_y):
    """torch_impl.procrustes_backward's formula: G = W Ỹ (k' Πᵀ), k' = −2 (grad / B) / (s_x s_y), then
    ∂ℓ/∂X = G − [s_x > EPS] (⟨G, X̃⟩ / s_x²) X̃ (and symmetrically for Y with Π)."""
    x, y, w = _tg._views(student, teacher, mask)
    k = (-2 * grad.to(torch.float32) / x.shape[0]) / (s_x * s_y)  # [B]
    out = []
    for need, z, o, mu, mu_o, s, pi, src in (
        (need_x, x, y, mu_x, mu_y, s_x, polar.transpose(1, 2), student),
        (need_y, y, x, mu_y, mu_x, s_y, polar, teacher),
    ):
        if not need:
            out.append(src.new_empty(0))
            continue
        q = (pi * k[:, None, None]).contiguous()  # [B, Do, D]
        none = z[:, :, :0]  # a one-sided pass: no P term (Dv = 0)
        cen = (mu_o, mu[:, :0]) if center else None
        g = _grad_gemm(o, none, w, None, None, q, q[:, :0], cen, torch.float32)  # [B, N, D] fp32
        zt = z.float() - mu[:, None, :] if center else z.float()
        if w is not None:
            zt = zt * w[..., None]
        r = s[:, None, None]
        dot = (g * zt).sum(dim=(1, 2))[:, None, None] / (r * r)
        g = g.addcmul_(zt, torch.where(r > EPS, -dot, torch.zeros_like(dot)))
        out.append(g.to(src.dtype).reshape(src.shape))
    return out[0], out[1]
