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

Procrustes: kd_kernels/triton/procrustes.py's ``procrustes_forward`` / ``procrustes_backward``
with ``prims=CUDA_PRIMS`` (products pass, the polar factor on the small Ds x Dt matrix: SVD / eigh
or Newton–Schulz above 512, one one-sided backward GEMM pass; its docstring lists what is left).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kd_kernels.ops._define import cuda_function
from kd_kernels.torch_impl import geometry as _torch
from kd_kernels.triton import geometry as _tg
from kd_kernels.triton import procrustes as _procrustes

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


# Procrustes: the shared launch logic of kd_kernels/triton/procrustes.py (products pass, polar
# factor, one-sided backward GEMM) on the CUDA C++ primitives.
def procrustes_fwd_cuda(student, teacher, mask, center: bool):
    loss, saved = _procrustes.procrustes_forward(student, teacher, mask, center, prims=CUDA_PRIMS)
    return (loss, *saved)


def procrustes_bwd_cuda(grad, student, teacher, mask, mu_x, s_x, mu_y, s_y, polar, center, need_x, need_y):
    saved = (mu_x, s_x, mu_y, s_y, polar)
    return _procrustes.procrustes_backward(grad, student, teacher, mask, saved, center, need_x, need_y, prims=CUDA_PRIMS)
