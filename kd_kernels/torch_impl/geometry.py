"""Memory-efficient PyTorch path of the feature-geometry losses, with hand-written backward.

Gram, CKA and relation losses are functions of three inner products of Gram matrices, which
this module evaluates either in the D x D form (Ds x Ds, Ds x Dt, Dt x Dt products, O(D²)
memory; used when N > max(Ds, Dt)) or in the N x N form (two N x N Gram matrices; used
otherwise). The choice is static (shapes only). Procrustes always works on the small
Ds x Dt matrix X̄ᵀȲ. Every function here is plain tensor math (no autograd inside), with no
host syncs: masks multiply rows, kept-row counts are device tensors, and degenerate cases
are handled with ``torch.where``. fp16/bf16 inputs are computed in float32, float64 stays
float64; the loss has the student's dtype, each gradient its input's dtype.

Inputs ``[N, D]`` are treated as a batch of one; batched ``[B, N, D]`` uses batched matmuls
(no loop over B) and the loss is the mean of the B per-item losses.

The derivations (why each step holds, the rank argument for Procrustes, what is saved) are in
docs/geometry.md; below is the summary of the formulas this code follows.

Math (per batch item; X = student ``[N, Ds]``, Y = teacher ``[N, Dt]``, w = 0/1 row mask,
n = Σ w, EPS = 1e-12)
---------------------------------------------------------------------------------------------
Row preprocessing, X → X̄ (likewise Y → Ȳ):
    centring        μ = Σ_i w_i x_i / n,        X̃_i = w_i (x_i − μ)     (else X̃_i = w_i x_i)
    "frob" scaling  s = max(‖X̃‖_F, EPS),        X̄ = X̃ / s                (gram/procrustes/cka)
    "row"  scaling  r_i = max(‖X̃_i‖, EPS),      x̄_i = X̃_i / r_i          (relation, F.normalize)
  backward (g = ∂L/∂X̄):
    "frob"   g ← (g − [‖X̃‖_F > EPS] ⟨g, X̄⟩ X̄) / s
    "row"    g_i ← (g_i − [‖X̃_i‖ > EPS] ⟨g_i, x̄_i⟩ x̄_i) / r_i
  (the EPS clamp, F.normalize's, keeps constant features finite: X̄ = 0, not 0/0)
    mask     h = w ⊙ g;   centring  ∂L/∂x_j = h_j − w_j Σ_i h_i / n      (else ∂L/∂x = h)

Gram products. With K = X̄X̄ᵀ, L = ȲȲᵀ (N x N) and B = X̄ᵀX̄, A = X̄ᵀȲ, C = ȲᵀȲ (D x D):
    P_xx = ‖K‖² = ‖B‖²,   P_xy = ⟨K, L⟩ = ‖A‖²,   P_yy = ‖L‖² = ‖C‖²   (docs/geometry.md §3)
  For a loss ℓ(P) with a = ∂ℓ/∂P_xx, b = ∂ℓ/∂P_xy, c = ∂ℓ/∂P_yy:
    ∂ℓ/∂X̄ = 4a X̄B + 2b ȲAᵀ  = (4a K + 2b L) X̄
    ∂ℓ/∂Ȳ = 4c ȲC + 2b X̄A   = (4c L + 2b K) Ȳ

Losses:
  gram        ℓ = P_xx − 2 P_xy + P_yy = ‖X̄X̄ᵀ − ȲȲᵀ‖²          a = c = 1, b = −2
  cka         ℓ = 1 − h_xy / √(h_xx h_yy) on the centred, unit-Frobenius X̄, Ȳ (CKA is scale
              invariant, the scaling only keeps every h in [0, 1] for fp32). Biased: h = P.
              Unbiased (HSIC₁, Kornblith's feature-space helper, = n(n−3)·HSIC₁):
                h_xy = P_xy − c₁⟨ρ_x, ρ_y⟩ + c₂ σ_x σ_y,  ρ_i = ‖x̄_i‖² (row sums of squares),
                σ = Σ_i ρ_i, c₁ = n/(n−2), c₂ = 1/((n−1)(n−2)); h_xx, h_yy likewise.
              With κ = h_xy/√(h_xx h_yy): ∂ℓ/∂h_xy = −1/√(h_xx h_yy), ∂ℓ/∂h_xx = κ/(2h_xx),
              ∂ℓ/∂h_yy = κ/(2h_yy); the extra unbiased terms add the row scaling
                ∂ℓ/∂x̄_i += x̄_i (−4a c₁ρ_x,i − 2b c₁ρ_y,i + 4a c₂σ_x + 2b c₂σ_y)   (Ȳ symmetric).
              Guard: when h_xx ≤ 0 or h_yy ≤ 0 (constant features; the unbiased estimator
              with tiny n) κ is taken as 0: loss 1, zero gradient. h_xy < 0 (unbiased only)
              is legitimate: κ < 0, loss > 1.
  relation    ℓ = 1 − P_xy / √(P_xx P_yy) with the "row" preprocessing and no centring:
              then K = R_s, L = R_t are the cosine self-similarity matrices (docs/geometry.md §6).
  procrustes  ℓ = 2 − 2‖M‖_*, M = X̄ᵀȲ = UΣVᵀ (thin SVD in fp32/fp64), Π = U 1[σ > tol] Vᵀ:
                ∂ℓ/∂X̄ = −2 Ȳ Πᵀ,   ∂ℓ/∂Ȳ = −2 X̄ Π.
              Π (the polar factor) is unique on the range of M even for repeated singular
              values; directions with σ = 0 are dropped (tol = σ_max·eps, the SVD's own
              resolution): the exact gradient whenever rank M = rank X̄ = rank Ȳ (e.g. N ≤ D
              with generic data), the minimum-norm subgradient otherwise. The tolerance must
              not be larger (a ~20% wrong fp32 gradient on ill-conditioned M): docs/geometry.md §7.
"""

from __future__ import annotations

import torch

DD = "dd"  # D x D form: Ds x Ds, Ds x Dt, Dt x Dt products
NN = "nn"  # N x N form: the two N x N Gram matrices
FROB, ROW, NONE = "frob", "row", "none"  # row preprocessing: unit Frobenius / unit rows / none
EPS = 1e-12  # F.normalize's default eps: floor of the row / Frobenius norms we divide by

Saved = tuple[torch.Tensor, ...]


def compute_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """float64 when either input is float64, else float32 (fp16/bf16 are upcast)."""
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def choose_form(n: int, ds: int, dt: int, form: str | None = None) -> str:
    """The static D x D / N x N decision: ``DD`` when N > max(Ds, Dt), else ``NN``."""
    if form is not None:
        if form not in (DD, NN):
            raise ValueError(f"form must be {DD!r}, {NN!r} or None, got {form!r}")
        return form
    return DD if n > max(ds, dt) else NN


def _inputs(student, teacher, mask):
    """3-D compute-dtype views, the row weights ``w`` [B, N, 1] (or None) and the count n."""
    dt = compute_dtype(student, teacher)
    x = (student if student.dim() == 3 else student[None]).to(dt)
    y = (teacher if teacher.dim() == 3 else teacher[None]).to(dt)
    if mask is None:
        return x, y, None, x.shape[1]
    w = (mask.reshape(x.shape[0], x.shape[1], 1) != 0).to(dt)  # any nonzero keeps the row, as .bool()
    return x, y, w, w.sum(dim=1, keepdim=True)  # count: [B, 1, 1] on the device


def _apply_prep(x, w, mu, scale, center: bool, norm: str) -> torch.Tensor:
    """X̄ from X and the saved statistics (forward and backward use this same sequence)."""
    if center:
        x = x - mu[:, None, :]
    if w is not None:
        x = x * w
    if norm == FROB:
        x = x / scale[:, None, None]
    elif norm == ROW:
        x = x / scale[..., None]
    return x


def _prep(x, w, n, center: bool, norm: str):
    """Forward of the row preprocessing: returns (X̄, μ [B, D] or empty, scale or empty)."""
    mu = x.new_empty(0)  # separate empties: op outputs must not alias each other
    if center:
        mu = x.mean(dim=1) if w is None else (x * w).sum(dim=1) / n[:, 0]
    xt = _apply_prep(x, w, mu, None, center, NONE)
    if norm == FROB:
        scale = torch.linalg.vector_norm(xt, dim=(1, 2)).clamp_min(EPS)
    elif norm == ROW:
        scale = torch.linalg.vector_norm(xt, dim=2).clamp_min(EPS)
    else:
        return xt, mu, x.new_empty(0)
    return _apply_prep(xt, None, mu, scale, False, norm), mu, scale


def _prep_backward(g, xb, w, n, scale, center: bool, norm: str) -> torch.Tensor:
    """∂L/∂X from g = ∂L/∂X̄ (see the module docstring)."""
    if norm != NONE:
        frob = norm == FROB
        r = scale[:, None, None] if frob else scale[..., None]
        dot = (g * xb).sum(dim=(1, 2) if frob else 2, keepdim=True)
        g = (g - torch.where(r > EPS, dot, torch.zeros_like(dot)) * xb) / r
    if w is not None:
        g = g * w
    if center:
        mean = g.sum(dim=1, keepdim=True) / n
        g = g - (mean if w is None else w * mean)
    return g


def _products(xb, yb, form: str):
    """The saved Gram products and P = (P_xx, P_xy, P_yy) as a [B, 3] tensor."""
    if form == DD:
        xt = xb.transpose(1, 2)
        m_xx, m_xy, m_yy = torch.bmm(xt, xb), torch.bmm(xt, yb), torch.bmm(yb.transpose(1, 2), yb)
        p_xy = m_xy.square().sum(dim=(1, 2))
    else:
        m_xx, m_yy = torch.bmm(xb, xb.transpose(1, 2)), torch.bmm(yb, yb.transpose(1, 2))
        m_xy = xb.new_empty(0)
        p_xy = (m_xx * m_yy).sum(dim=(1, 2))
    p = torch.stack([m_xx.square().sum(dim=(1, 2)), p_xy, m_yy.square().sum(dim=(1, 2))], dim=1)
    return m_xx, m_xy, m_yy, p


def _products_backward(xb, yb, m_xx, m_xy, m_yy, a, b, c, form: str, need_x: bool, need_y: bool):
    """(∂ℓ/∂X̄, ∂ℓ/∂Ȳ) for ℓ(P_xx, P_xy, P_yy) with per-item a, b, c of shape [B, 1, 1]."""
    gx = gy = None
    if form == DD:
        if need_x:
            gx = torch.baddbmm(torch.bmm(xb, m_xx * (4 * a)), yb, m_xy.transpose(1, 2) * (2 * b))
        if need_y:
            gy = torch.baddbmm(torch.bmm(yb, m_yy * (4 * c)), xb, m_xy * (2 * b))
    else:
        if need_x:
            gx = torch.bmm(m_xx * (4 * a) + m_yy * (2 * b), xb)
        if need_y:
            gy = torch.bmm(m_yy * (4 * c) + m_xx * (2 * b), yb)
    return gx, gy


def _hsic1_terms(xb, yb, n):
    """Row sums of squares ρ, totals σ and the constants c₁, c₂ of the unbiased HSIC."""
    rx, ry = xb.square().sum(dim=2), yb.square().sum(dim=2)  # [B, N]
    n = xb.new_full((1,), n) if isinstance(n, int) else n.reshape(-1)  # [1] or [B]; a fill, not a copy
    c1, c2 = n / (n - 2), 1 / ((n - 1) * (n - 2))
    return rx, ry, rx.sum(dim=1), ry.sum(dim=1), c1, c2


def _hsic1_row_scale(a, b, c1, c2, r_self, r_other, s_self, s_other):
    """The row scaling [B, N, 1] that the unbiased HSIC terms add to ∂ℓ/∂X̄ (a = ∂ℓ/∂h_xx, b = ∂ℓ/∂h_xy)."""
    a, b, c1 = a[:, None], b[:, None], c1[:, None]
    col = 4 * a * c2[:, None] * s_self[:, None] + 2 * b * c2[:, None] * s_other[:, None]
    return (col - c1 * (4 * a * r_self + 2 * b * r_other))[..., None]


def _cosine(h):
    """κ = h_xy / √(h_xx h_yy) with the degenerate guard; returns (κ, 1/√(h_xx h_yy) or 0)."""
    hxx, hxy, hyy = h.unbind(dim=1)
    ok = (hxx > 0) & (hyy > 0)
    one = torch.ones_like(hxx)
    inv = torch.where(ok, torch.rsqrt(torch.where(ok, hxx, one)) * torch.rsqrt(torch.where(ok, hyy, one)), 0 * one)
    return hxy * inv, inv


_KINDS = {  # kind -> (centre, row preprocessing); gram's flags come from its arguments
    "cka": (True, FROB),
    "relation": (False, ROW),
}


def _geometry_forward(kind, student, teacher, mask, center, norm, unbiased, form):
    x, y, w, n = _inputs(student, teacher, mask)
    form = choose_form(x.shape[1], x.shape[2], y.shape[2], form)
    xb, mu_x, s_x = _prep(x, w, n, center, norm)
    yb, mu_y, s_y = _prep(y, w, n, center, norm)
    m_xx, m_xy, m_yy, h = _products(xb, yb, form)
    if kind == "gram":
        per_item = h[:, 0] - 2 * h[:, 1] + h[:, 2]
    else:
        if unbiased:
            rx, ry, sx, sy, c1, c2 = _hsic1_terms(xb, yb, n)
            h = h + torch.stack(
                [
                    c2 * sx * sx - c1 * (rx * rx).sum(dim=1),
                    c2 * sx * sy - c1 * (rx * ry).sum(dim=1),
                    c2 * sy * sy - c1 * (ry * ry).sum(dim=1),
                ],
                dim=1,
            )
        per_item = 1 - _cosine(h)[0]
    loss = per_item.mean().to(student.dtype)
    return loss, (mu_x, s_x, mu_y, s_y, m_xx, m_xy, m_yy, h)


def _geometry_backward(kind, grad, student, teacher, mask, saved, center, norm, unbiased, need_x, need_y, form):
    mu_x, s_x, mu_y, s_y, m_xx, m_xy, m_yy, h = saved
    x, y, w, n = _inputs(student, teacher, mask)
    form = choose_form(x.shape[1], x.shape[2], y.shape[2], form)
    xb, yb = _apply_prep(x, w, mu_x, s_x, center, norm), _apply_prep(y, w, mu_y, s_y, center, norm)
    gscale = grad.to(x.dtype) / x.shape[0]  # d(mean over B)
    if kind == "gram":
        a = c = gscale.expand(x.shape[0])
        b = -2 * a
    else:
        kappa, inv = _cosine(h)
        ok = inv > 0
        hxx, _, hyy = h.unbind(dim=1)
        one = torch.ones_like(hxx)
        a = gscale * torch.where(ok, kappa / (2 * torch.where(ok, hxx, one)), 0 * one)
        c = gscale * torch.where(ok, kappa / (2 * torch.where(ok, hyy, one)), 0 * one)
        b = -gscale * inv
    a3, b3, c3 = a[:, None, None], b[:, None, None], c[:, None, None]
    gx, gy = _products_backward(xb, yb, m_xx, m_xy, m_yy, a3, b3, c3, form, need_x, need_y)
    if kind == "cka" and unbiased:
        rx, ry, sx, sy, c1, c2 = _hsic1_terms(xb, yb, n)
        if need_x:
            gx = gx + xb * _hsic1_row_scale(a, b, c1, c2, rx, ry, sx, sy)
        if need_y:
            gy = gy + yb * _hsic1_row_scale(c, b, c1, c2, ry, rx, sy, sx)
    return _finish(gx, gy, xb, yb, student, teacher, w, n, (s_x, s_y), center, norm)


def _finish(gx, gy, xb, yb, student, teacher, w, n, scales, center, norm):
    """Chain through the preprocessing; cast and reshape to the inputs (empty when not needed)."""
    out = []
    for g, zb, z, s in ((gx, xb, student, scales[0]), (gy, yb, teacher, scales[1])):
        if g is None:
            out.append(z.new_empty(0))
        else:
            out.append(_prep_backward(g, zb, w, n, s, center, norm).to(z.dtype).reshape(z.shape))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Public torch-path functions (called by kd_kernels/ops/geometry.py). Each *_forward returns
# (loss in the student's dtype, saved statistics); each *_backward returns
# (grad_student, grad_teacher), an empty tensor for a gradient that is not needed.
# ``form`` (DD / NN / None = automatic) forces a form, for the tests.
# Saved layout of gram / cka / relation: (μ_x, scale_x, μ_y, scale_y, M_xx, M_xy, M_yy, h)
# with μ [B, D] (empty without centring), scale [B] ("frob"), [B, N] ("row") or empty,
# M = B, A, C (DD) or K, empty, L (NN), and h = (h_xx, h_xy, h_yy) as [B, 3].
# ---------------------------------------------------------------------------------------------


def gram_forward(student, teacher, mask, center: bool, normalize: bool, form: str | None = None):
    return _geometry_forward("gram", student, teacher, mask, center, FROB if normalize else NONE, False, form)


def gram_backward(
    grad,
    student,
    teacher,
    mask,
    saved: Saved,
    center: bool,
    normalize: bool,
    need_student: bool,
    need_teacher: bool,
    form: str | None = None,
):
    norm = FROB if normalize else NONE
    return _geometry_backward(
        "gram", grad, student, teacher, mask, saved, center, norm, False, need_student, need_teacher, form
    )


def cka_forward(student, teacher, mask, unbiased: bool, form: str | None = None):
    return _geometry_forward("cka", student, teacher, mask, *_KINDS["cka"], unbiased, form)


def cka_backward(
    grad,
    student,
    teacher,
    mask,
    saved: Saved,
    unbiased: bool,
    need_student: bool,
    need_teacher: bool,
    form: str | None = None,
):
    return _geometry_backward(
        "cka", grad, student, teacher, mask, saved, *_KINDS["cka"], unbiased, need_student, need_teacher, form
    )


def relation_forward(student, teacher, mask, form: str | None = None):
    return _geometry_forward("relation", student, teacher, mask, *_KINDS["relation"], False, form)


def relation_backward(
    grad, student, teacher, mask, saved: Saved, need_student: bool, need_teacher: bool, form: str | None = None
):
    return _geometry_backward(
        "relation", grad, student, teacher, mask, saved, *_KINDS["relation"], False, need_student, need_teacher, form
    )


def procrustes_forward(student, teacher, mask, center: bool):
    """Saved layout: (μ_x, s_x, μ_y, s_y, Π) with the polar factor Π [B, Ds, Dt]."""
    x, y, w, n = _inputs(student, teacher, mask)
    xb, mu_x, s_x = _prep(x, w, n, center, FROB)
    yb, mu_y, s_y = _prep(y, w, n, center, FROB)
    m = torch.bmm(xb.transpose(1, 2), yb)
    # Non-finite input (NaN/inf, or an item without kept rows): LAPACK/cuSOLVER would raise
    # torch._LinAlgError. Such items get the SVD of 0 instead and NaN results (loss and, through
    # the polar factor, gradients), selected on the device: no host sync.
    bad = ~torch.isfinite(m).all(dim=(1, 2))  # [B]
    m = torch.where(bad[:, None, None], 0.0, m)
    try:
        u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    except torch.linalg.LinAlgError as err:  # finite but did not converge (not seen in practice)
        raise RuntimeError(f"procrustes_loss: the SVD of X̄ᵀȲ did not converge: {err}") from None
    sv = torch.where(bad[:, None], torch.nan, sv)
    tol = sv[:, :1] * torch.finfo(sv.dtype).eps  # only the SVD's noise floor: docs/geometry.md §7
    polar = torch.bmm(u * (sv > tol).to(sv.dtype)[:, None, :], vh)
    polar = torch.where(bad[:, None, None], torch.nan, polar)
    loss = (2 - 2 * sv.sum(dim=1)).mean().to(student.dtype)
    return loss, (mu_x, s_x, mu_y, s_y, polar)


def procrustes_backward(
    grad, student, teacher, mask, saved: Saved, center: bool, need_student: bool, need_teacher: bool
):
    mu_x, s_x, mu_y, s_y, polar = saved
    x, y, w, n = _inputs(student, teacher, mask)
    xb, yb = _apply_prep(x, w, mu_x, s_x, center, FROB), _apply_prep(y, w, mu_y, s_y, center, FROB)
    k = (-2 * grad.to(x.dtype) / x.shape[0]).reshape(1, 1, 1)
    gx = torch.bmm(yb, polar.transpose(1, 2) * k) if need_student else None
    gy = torch.bmm(xb, polar * k) if need_teacher else None
    return _finish(gx, gy, xb, yb, student, teacher, w, n, (s_x, s_y), center, FROB)
