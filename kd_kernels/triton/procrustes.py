"""Triton launchers of the Procrustes loss; math in docs/geometry.md §7 and the module docstring of
kd_kernels/torch_impl/geometry.py (ℓ = 2 − 2‖M‖_*, M = X̄ᵀȲ, saved (μ_x, s_x, μ_y, s_y, Π)).

Forward: the streaming products pass of kd_kernels/triton/geometry.py (``_products`` on
``_dd_products_kernel``: masks in the loads, the per-item shift, column sums and count in the same
pass) gives X'ᵀWY' and the traces of X'ᵀWX', Y'ᵀWY'; with δ = Σ w x'/n (x' = x − c) the centring is
the rank-1 correction X̃ᵀỸ = X'ᵀWY' − n δ_x δ_yᵀ, ‖X̃‖²_F = tr X'ᵀWX' − n‖δ_x‖², μ = c + δ.
M = X̃ᵀỸ/(s_x s_y) on the small Ds x Dt matrix. The polar factor Π and ‖M‖_*:

- min(Ds, Dt) <= ``NS_MIN_DIM``: the torch path's functions (``_polar_gram`` / ``_polar_svd``:
  float64 eigh of the small Gram, or the thin SVD), the same Π as backend="torch";
- larger: a Newton–Schulz iteration in batched GEMMs (``polar_newton_schulz``, no SVD, no host
  sync; its accuracy is stated there), ‖M‖_* = ⟨Π, M⟩.

Backward (torch_impl.procrustes_backward's formula): G = W Ỹ (k' Πᵀ), k' = −2 (grad/B)/(s_x s_y),
is one pass of the one-sided ``_grad_gemm`` (``_dd_grad_kernel``, Ỹ centred in its loads), then
∂ℓ/∂X = G − [s_x > EPS](⟨G, X̃⟩/s_x²) X̃ (symmetrically for Y with Π).

Left: the products pass also forms X'ᵀWX', Y'ᵀWY' though only their traces are used (a cross-only
variant of the kernel, with the traces from the row pass, would save Ds² + Dt² of Ds² + DsDt + Dt²
flops); the projection runs as torch ops on [B, N, D] fp32 (⟨G, X̃⟩ = k' s_x s_y ‖M‖_* needs the
nuclear norm, which the saved layout does not hold, so it is a reduction over G after the pass).

Every function takes ``prims`` = (products, grad_gemm, row_sq) with the signatures of
``kd_kernels.triton.geometry._products`` / ``_grad_gemm`` / ``_row_sq`` (None = those Triton ones;
kd_kernels/ops/geometry_cuda.py has the CUDA C++ ones).
"""

from __future__ import annotations

import torch

from kd_kernels.torch_impl import geometry as _torch
from kd_kernels.triton import geometry as _g

__all__ = ["NS_MIN_DIM", "NS_SCHEDULE", "polar_newton_schulz", "procrustes_bwd_triton", "procrustes_fwd_triton"]

EPS = _torch.EPS

# Above this min(Ds, Dt) the polar factor comes from Newton–Schulz GEMMs instead of the SVD / eigh:
# a batched SVD (or eigh) of a k x k matrix runs at a small fraction of the GPU's GEMM rate, while
# the 16 iterations below cost ~12 k² max(Ds, Dt) · 16 flops of batched GEMMs; at k = 512 both
# are well under the products pass of a typical N >= 8k rows, beyond it the SVD starts to dominate.
NS_MIN_DIM = 512

# Newton–Schulz schedule, odd polynomials p(σ) = a σ + b σ³ + c σ⁵ applied to the singular values
# of X (X ← a X + (b A + c A²) X, A = XXᵀ on the smaller side):
# 12 steps of a steep quintic (slope 3.4445 at 0, the coefficients popularised by Muon's
#   orthogonaliser) grow every σ >= 1.2e-7 (relative to the initial scale ν below) into the band
#   [0.68, 1.2] (it does not converge to 1 by itself), then
# 4 steps of the order-3 quintic (15/8, −5/4, 3/8) (the Newton–Schulz series of (XᵀX)^{-1/2} to
#   second order) converge that band to 1 to within 1e-6 (exact arithmetic; scalar maps checked
#   on a log grid of σ ∈ [1e-9, 1]).
NS_SCHEDULE = ((3.4445, -4.7750, 2.0315),) * 12 + ((15 / 8, -10 / 8, 3 / 8),) * 4


def polar_newton_schulz(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖M‖_*, Π) of M [B, Ds, Dt] by Newton–Schulz iteration in batched GEMMs (no SVD, no host sync).

    X₀ = M/ν with ν = ‖MMᵀ‖_F^{1/2} (>= σ_max, <= k^{1/4} σ_max: a tighter start than ‖M‖_F,
    from the first iteration's own Gram), then ``NS_SCHEDULE``; Π = X, ‖M‖_* = ⟨Π, M⟩.

    Accuracy (fp32 GEMMs; measured against the SVD in tests/test_geometry_triton.py): every
    singular direction with σ >= 1.2e-7 ν (≈ 7e-7 σ_max at k = 1024) converges to 1 within 1e-6
    in exact arithmetic, so for those Π agrees with U Vᵀ to fp32 rounding (~1e-5 with k <= 1024)
    and ‖M‖_* to ~1e-6 relative. Below that the iteration is a soft threshold: p(σ) rises
    smoothly from 0 to 1, exact zeros stay 0 (p is odd), so rank-deficient M (N < D) keeps its
    null space out of Π as the SVD's tolerance does; directions near the threshold are partially
    included, which changes ‖M‖_* by at most Σ_{σ < 1.2e-7 ν} σ and the gradient only in those
    directions (the SVD path resolves σ down to eps·σ_max = 1.2e-7 σ_max: comparable).
    Under torch's TF32 matmul switch the GEMMs run in TF32 and Π has TF32 accuracy (~1e-3)."""
    wide = m.shape[1] <= m.shape[2]
    x = m if wide else m.transpose(1, 2)  # [B, k, K], k <= K
    a0 = torch.bmm(x, x.transpose(1, 2))
    nu2 = torch.linalg.matrix_norm(a0).clamp_min(torch.finfo(m.dtype).tiny)[:, None, None]  # ν²
    x = x / nu2.sqrt()
    a = a0 / nu2
    for i, (ca, cb, cc) in enumerate(NS_SCHEDULE):
        if i:
            a = torch.bmm(x, x.transpose(1, 2))
        poly = torch.baddbmm(a, a, a, beta=cb, alpha=cc)  # b A + c A²
        x = torch.baddbmm(x, poly, x, beta=ca)  # a X + (b A + c A²) X
    polar = x if wide else x.transpose(1, 2)
    return _torch._bdot(polar, m), polar.contiguous()


def _prims(prims):
    return prims or (_g._products, _g._grad_gemm, _g._row_sq)


def procrustes_forward(student, teacher, mask, center: bool, prims=None):
    """Loss and the saved (μ_x, s_x, μ_y, s_y, Π) of the op contract (module docstring)."""
    products = _prims(prims)[0]
    x, y, w = _g._views(student, teacher, mask)
    shift = _g._shifts(x, y, w) if center and x.dtype == torch.float32 else None  # why: _g._dd_forward
    mxx, mxy, myy, csx, csy, cnt = products(x, y, w, None, None, shift)
    tr_x = mxx.diagonal(dim1=1, dim2=2).sum(dim=1)
    tr_y = myy.diagonal(dim1=1, dim2=2).sum(dim=1)
    mu_x = x.new_empty(0, dtype=torch.float32)
    mu_y = x.new_empty(0, dtype=torch.float32)
    if center:
        d_x, d_y = csx / cnt[:, None], csy / cnt[:, None]  # 0/0 = NaN for an item without kept rows
        mu_x, mu_y = (d_x, d_y) if shift is None else (shift[0] + d_x, shift[1] + d_y)
        mxy = mxy - cnt[:, None, None] * d_x[:, :, None] * d_y[:, None, :]
        tr_x = tr_x - cnt * d_x.square().sum(dim=1)
        tr_y = tr_y - cnt * d_y.square().sum(dim=1)
    s_x = tr_x.clamp_min(0).sqrt().clamp_min(EPS)
    s_y = tr_y.clamp_min(0).sqrt().clamp_min(EPS)
    m = mxy / (s_x * s_y)[:, None, None]
    # non-finite input: the torch path's rule (torch_impl.procrustes_forward): the item gets the
    # polar factor of 0 and NaN results, selected on the device
    bad = ~torch.isfinite(m).all(dim=(1, 2))
    m = torch.where(bad[:, None, None], 0.0, m)
    if min(m.shape[1:]) > NS_MIN_DIM:
        nuc, polar = polar_newton_schulz(m)
    else:
        try:
            nuc, polar = _torch._polar_gram(m) if _torch.use_gram_eigh(m) else _torch._polar_svd(m)
        except torch.linalg.LinAlgError as err:  # finite but did not converge (not seen in practice)
            raise RuntimeError(f"procrustes_loss: the SVD of X̄ᵀȲ did not converge: {err}") from None
    polar = torch.where(bad[:, None, None], torch.nan, polar)
    loss = (2 - 2 * torch.where(bad, torch.nan, nuc)).mean().to(student.dtype)
    return loss, (mu_x, s_x, mu_y, s_y, polar)


def procrustes_backward(grad, student, teacher, mask, saved, center: bool, need_x: bool, need_y: bool, prims=None):
    """(∂ℓ/∂X, ∂ℓ/∂Y): G = W Ỹ (k' Πᵀ) in one GEMM pass, then G − [s_x > EPS](⟨G, X̃⟩/s_x²) X̃."""
    grad_gemm = _prims(prims)[1]
    mu_x, s_x, mu_y, s_y, polar = saved
    x, y, w = _g._views(student, teacher, mask)
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
        # one-sided pass: the "P" operand is empty (Dv = 0), the "Q" side is the other input
        cen = (mu_o, mu[:, :0]) if center else None
        g = grad_gemm(o, z[:, :, :0], w, None, None, q, q[:, :0], cen, torch.float32)  # [B, N, D] fp32
        zt = z.float() - mu[:, None, :] if center else z.float()
        if w is not None:
            zt = zt * w[..., None]
        r = s[:, None, None]
        dot = _torch._bdot(g, zt)[:, None, None] / (r * r)
        g = g.addcmul_(zt, torch.where(r > EPS, -dot, torch.zeros_like(dot)))
        out.append(g.to(src.dtype).reshape(src.shape))
    return out[0], out[1]


# --------------------------------------------------------------------------- op contracts


def procrustes_fwd_triton(student, teacher, mask, center: bool):
    loss, saved = procrustes_forward(student, teacher, mask, center)
    return (loss, *saved)


def procrustes_bwd_triton(grad, student, teacher, mask, mu_x, s_x, mu_y, s_y, polar, center, need_x, need_y):
    return procrustes_backward(grad, student, teacher, mask, (mu_x, s_x, mu_y, s_y, polar), center, need_x, need_y)
