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
  Three of these steps are exact no-ops for the g the losses produce and are skipped
  (:func:`_grad_prep`, docs/geometry.md §2): the mask (every term of g is a product with
  rows of X̄ or Ȳ, which are 0 on dropped rows), the centring (g built from centred X̄, Ȳ
  has zero column sums; only the unbiased-HSIC row term breaks that, so cka(unbiased) keeps
  it) and, for CKA, the "frob" projection (CKA is invariant to the scale of X̄: ⟨g, X̄⟩ = 0).

Gram products. With K = X̄X̄ᵀ, L = ȲȲᵀ (N x N) and B = X̄ᵀX̄, A = X̄ᵀȲ, C = ȲᵀȲ (D x D):
    P_xx = ‖K‖² = ‖B‖²,   P_xy = ⟨K, L⟩ = ‖A‖²,   P_yy = ‖L‖² = ‖C‖²   (docs/geometry.md §3)
  For a loss ℓ(P) with a = ∂ℓ/∂P_xx, b = ∂ℓ/∂P_xy, c = ∂ℓ/∂P_yy:
    ∂ℓ/∂X̄ = 4a X̄B + 2b ȲAᵀ  = (4a K + 2b L) X̄
    ∂ℓ/∂Ȳ = 4c ȲC + 2b X̄A   = (4c L + 2b K) Ȳ
  N x N form, one N x N pass per side: gram saves D = K − L in the K slot (its loss is ‖D‖²,
  formed directly) and uses ∂ℓ/∂X̄ = 4γ D X̄, ∂ℓ/∂Ȳ = −4γ D Ȳ (γ = grad/B); cka/relation use
  4aK + 2bL = 2b (L − (h_xy/h_xx) K) and 4cL + 2bK = 2b (K − (h_xy/h_yy) L). The backward
  rebuilds only the side it differentiates (the D x D form needs both). Frobenius inner
  products (the P, ⟨g, X̄⟩) are one-pass batched dots (:func:`_bdot`).

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
  procrustes  ℓ = 2 − 2‖M‖_*, M = X̄ᵀȲ = UΣVᵀ (thin SVD in fp32/fp64), Π = U 1[σ > tol] Vᵀ.
              M is formed as X̃ᵀỸ/(s_x s_y) (the scaling on the small matrix). For fp32 M whose
              sides differ by 2x or more, σ and Π come from the float64 eigh of the k x k Gram
              (MMᵀ or MᵀM, k = min(Ds, Dt)) instead: cheaper than the SVD there and at least
              as accurate (:func:`_polar_gram`, docs/geometry.md §7). Backward on X̃, Ỹ:
              G = Ỹ(−2γ/(s_x s_y) Πᵀ), ∂ℓ/∂X = G − [s_x > EPS](⟨G, X̃⟩/s_x²) X̃ (mask and
              centring steps are no-ops, as above):
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
    """The static D x D / N x N decision: ``DD`` when N > max(Ds, Dt), else ``NN``.

    By flops (student gradient only) N x N is the cheaper form up to N* = (2Ds² + 2DsDt + Dt²)
    / (2Ds + Dt) >= max(Ds, Dt), so ``NN`` is only chosen where it is also cheaper; between
    max(Ds, Dt) and N* ``DD`` is kept for its O(D²) memory (docs/geometry.md §3)."""
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
    """X̄ from X and the saved statistics (forward and backward use this same sequence).

    After the first step makes a new tensor the others run in place; X itself is never written.
    """
    fresh = False
    if center:
        x, fresh = x - mu[:, None, :], True
    if w is not None:
        x, fresh = (x.mul_(w) if fresh else x * w), True
    if norm != NONE:
        r = scale[:, None, None] if norm == FROB else scale[..., None]
        x = x.div_(r) if fresh else x / r
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
    r = scale[:, None, None] if norm == FROB else scale[..., None]
    return (xt.div_(r) if xt is not x else xt / r), mu, scale  # xt is new unless no centring / mask


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


def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-item Frobenius inner product ⟨a_b, b_b⟩ of two [B, ...] tensors, as [B]: one pass
    over both (a batched GEMV), where ``(a * b).sum()`` makes a temporary and reads it again."""
    bsz = a.shape[0]
    return torch.bmm(a.reshape(bsz, 1, -1), b.reshape(bsz, -1, 1)).reshape(bsz)


def _products(kind: str, xb, yb, form: str):
    """The saved Gram products and h = (h_xx, h_xy, h_yy) as a [B, 3] tensor (P; see below).

    D x D form: (Bm, A, C) and h = P. N x N form: (K, -, L) and h = P, except for gram,
    whose loss ‖K − L‖² is formed directly (one N x N pass, no cancellation between the three
    P): the first slot then holds K − L, and h = (ℓ, 0, 0) (the gram backward reads no h).
    """
    if form == DD:
        xt = xb.transpose(1, 2)
        m_xx, m_xy, m_yy = torch.bmm(xt, xb), torch.bmm(xt, yb), torch.bmm(yb.transpose(1, 2), yb)
        return m_xx, m_xy, m_yy, torch.stack([_bdot(m_xx, m_xx), _bdot(m_xy, m_xy), _bdot(m_yy, m_yy)], dim=1)
    m_xx, m_yy = torch.bmm(xb, xb.transpose(1, 2)), torch.bmm(yb, yb.transpose(1, 2))
    m_xy = xb.new_empty(0)
    if kind == "gram":
        m_xx = m_xx.sub_(m_yy)  # K − L, in place (K is not needed)
        loss = _bdot(m_xx, m_xx)
        return m_xx, m_xy, m_yy, torch.nn.functional.pad(loss[:, None], (0, 2))  # (ℓ, 0, 0)
    return m_xx, m_xy, m_yy, torch.stack([_bdot(m_xx, m_xx), _bdot(m_xx, m_yy), _bdot(m_yy, m_yy)], dim=1)


def _row_sq(zb, m_self, form: str):
    """ρ_i = ‖z̄_i‖²: the diagonal of the saved N x N Gram matrix (N x N form), else from the rows."""
    return torch.diagonal(m_self, dim1=1, dim2=2) if form == NN else zb.square().sum(dim=2)


def _hsic1_stats(rx, ry, n, like):
    """Totals σ and the constants c₁, c₂ of the unbiased HSIC from the row sums of squares ρ."""
    n = like.new_full((1,), n) if isinstance(n, int) else n.reshape(-1)  # [1] or [B]; a fill, not a copy
    return rx.sum(dim=1), ry.sum(dim=1), n / (n - 2), 1 / ((n - 1) * (n - 2))


def _grad_prep(g, alpha, zb, w, n, scale, center: bool, norm: str, project: bool) -> torch.Tensor:
    """∂L/∂Z from g with ∂L/∂Z̄ = alpha·g (alpha [B, 1, 1] or None = 1); g is modified in place.

    The preprocessing backward of the module docstring, with three steps dropped where they
    are exact no-ops (docs/geometry.md §2): the mask (g is already 0 on dropped rows: every
    term of g is a product with Z̄ or Ȳ rows, 0 there), the centring (the column sums of g are
    0 when g is built from centred Z̄, Ȳ only; the caller asks for it with ``center`` when a
    term breaks that, the unbiased-HSIC row scaling) and, with ``project=False``, the
    Frobenius projection (⟨g, Z̄⟩ = 0 when the loss is invariant to the scale of Z̄: CKA).
    """
    if norm == FROB:
        r = scale[:, None, None]
        if project:
            dot = _bdot(g, zb)[:, None, None]
            g = g.addcmul_(zb, torch.where(r > EPS, -dot, torch.zeros_like(dot)))
        g = g.mul_(1 / r if alpha is None else alpha / r)
    elif norm == ROW:
        r = scale[..., None]
        dot = (g * zb).sum(dim=2, keepdim=True)
        g = g.addcmul_(zb, torch.where(r > EPS, -dot, torch.zeros_like(dot)))
        g = g.mul_(1 / r if alpha is None else alpha / r)
    elif alpha is not None:
        g = g.mul_(alpha)
    if center:
        mean = g.sum(dim=1, keepdim=True) / n
        g = g - (mean if w is None else w * mean)
    return g


def _geometry_forward(kind, student, teacher, mask, center, norm, unbiased, form):
    x, y, w, n = _inputs(student, teacher, mask)
    form = choose_form(x.shape[1], x.shape[2], y.shape[2], form)
    xb, mu_x, s_x = _prep(x, w, n, center, norm)
    yb, mu_y, s_y = _prep(y, w, n, center, norm)
    m_xx, m_xy, m_yy, h = _products(kind, xb, yb, form)
    if kind == "gram":
        per_item = h[:, 0] if form == NN else h[:, 0] - 2 * h[:, 1] + h[:, 2]
    else:
        if unbiased:
            rx, ry = _row_sq(xb, m_xx, form), _row_sq(yb, m_yy, form)
            sx, sy, c1, c2 = _hsic1_stats(rx, ry, n, xb)
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
    # The N x N form needs only the side being differentiated; the D x D form needs both.
    xb = _apply_prep(x, w, mu_x, s_x, center, norm) if need_x or form == DD else None
    yb = _apply_prep(y, w, mu_y, s_y, center, norm) if need_y or form == DD else None
    gscale = grad.to(x.dtype) / x.shape[0]  # d(mean over B)
    if kind == "gram":
        a = c = gscale.expand(x.shape[0])
        b = -2 * a
    else:
        kappa, inv = _cosine(h)
        ok = inv > 0
        hxx, hxy, hyy = h.unbind(dim=1)
        one = torch.ones_like(hxx)
        a = gscale * torch.where(ok, kappa / (2 * torch.where(ok, hxx, one)), 0 * one)
        c = gscale * torch.where(ok, kappa / (2 * torch.where(ok, hyy, one)), 0 * one)
        b = -gscale * inv
    a3, b3, c3 = a[:, None, None], b[:, None, None], c[:, None, None]
    # g = alpha · G = ∂ℓ/∂X̄ (module docstring), G computed with one GEMM per side.
    gx = gy = alpha_x = alpha_y = None
    if form == DD:
        if need_x:
            gx = torch.baddbmm(torch.bmm(xb, m_xx * (4 * a3)), yb, m_xy.transpose(1, 2) * (2 * b3))
        if need_y:
            gy = torch.baddbmm(torch.bmm(yb, m_yy * (4 * c3)), xb, m_xy * (2 * b3))
    elif kind == "gram":  # m_xx holds K − L: 4K − 4L and 4L − 4K
        if need_x:
            gx, alpha_x = torch.bmm(m_xx, xb), 4 * a3
        if need_y:
            gy, alpha_y = torch.bmm(m_xx, yb), -4 * c3
    else:  # 4a K + 2b L = 2b (L − (h_xy/h_xx) K): one N x N pass per side (4a = 2b·(−h_xy/h_xx))
        hxx3, hxy3, hyy3, ok3 = hxx[:, None, None], hxy[:, None, None], hyy[:, None, None], ok[:, None, None]
        one3, zero3 = torch.ones_like(hxx3), torch.zeros_like(hxx3)
        if need_x:
            ratio = torch.where(ok3, -hxy3 / torch.where(ok3, hxx3, one3), zero3)
            gx, alpha_x = torch.bmm(torch.addcmul(m_yy, m_xx, ratio), xb), 2 * b3
        if need_y:
            ratio = torch.where(ok3, -hxy3 / torch.where(ok3, hyy3, one3), zero3)
            gy, alpha_y = torch.bmm(torch.addcmul(m_xx, m_yy, ratio), yb), 2 * b3
    hsic1 = kind == "cka" and unbiased
    if hsic1:
        rx, ry = _row_sq(xb, m_xx, form), _row_sq(yb, m_yy, form)  # xb / yb None only in the N x N form
        sx, sy, c1, c2 = _hsic1_stats(rx, ry, n, x)
        if need_x:
            gx = gx if alpha_x is None else gx.mul_(alpha_x)
            gx, alpha_x = gx.addcmul_(xb, _hsic1_row_scale(a, b, c1, c2, rx, ry, sx, sy)), None
        if need_y:
            gy = gy if alpha_y is None else gy.mul_(alpha_y)
            gy, alpha_y = gy.addcmul_(yb, _hsic1_row_scale(c, b, c1, c2, ry, rx, sy, sx)), None
    project = kind != "cka"  # CKA is invariant to the scale of X̄: ⟨g, X̄⟩ = 0
    center_bwd = center and hsic1
    out = []
    for g, alpha, zb, z, s in ((gx, alpha_x, xb, student, s_x), (gy, alpha_y, yb, teacher, s_y)):
        if g is None:
            out.append(z.new_empty(0))
        else:
            g = _grad_prep(g, alpha, zb, w, n, s, center_bwd, norm, project)
            out.append(g.to(z.dtype).reshape(z.shape))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Public torch-path functions (called by kd_kernels/ops/geometry.py). Each *_forward returns
# (loss in the student's dtype, saved statistics); each *_backward returns
# (grad_student, grad_teacher), an empty tensor for a gradient that is not needed.
# ``form`` (DD / NN / None = automatic) forces a form, for the tests.
# Saved layout of gram / cka / relation: (μ_x, scale_x, μ_y, scale_y, M_xx, M_xy, M_yy, h)
# with μ [B, D] (empty without centring), scale [B] ("frob"), [B, N] ("row") or empty,
# M = B, A, C (DD) or K, empty, L (NN; gram: K − L, empty, L), and h = (h_xx, h_xy, h_yy)
# as [B, 3] (gram NN: (ℓ, 0, 0); the gram backward reads no h).
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


def _centred(z, w, n, center: bool):
    """Z̃ = w ⊙ (Z − μ) (or w ⊙ Z) and μ [B, D] (empty without centring): the unscaled X̄."""
    mu = z.new_empty(0)
    if center:
        mu = z.mean(dim=1) if w is None else (z * w).sum(dim=1) / n[:, 0]
        z = z - mu[:, None, :]
        return (z if w is None else z.mul_(w)), mu
    return (z if w is None else z * w), mu


def procrustes_forward(student, teacher, mask, center: bool):
    """Saved layout: (μ_x, s_x, μ_y, s_y, Π) with the polar factor Π [B, Ds, Dt].

    M = X̄ᵀȲ is formed as X̃ᵀỸ / (s_x s_y): the scaling goes to the small Ds x Dt matrix
    instead of the two N x D ones (the same value up to rounding)."""
    x, y, w, n = _inputs(student, teacher, mask)
    xt, mu_x = _centred(x, w, n, center)
    yt, mu_y = _centred(y, w, n, center)
    s_x = torch.linalg.vector_norm(xt, dim=(1, 2)).clamp_min(EPS)
    s_y = torch.linalg.vector_norm(yt, dim=(1, 2)).clamp_min(EPS)
    m = torch.bmm(xt.transpose(1, 2), yt).div_((s_x * s_y)[:, None, None])
    # Non-finite input (NaN/inf, or an item without kept rows): LAPACK/cuSOLVER would raise
    # torch._LinAlgError. Such items get the SVD of 0 instead and NaN results (loss and, through
    # the polar factor, gradients), selected on the device: no host sync.
    bad = ~torch.isfinite(m).all(dim=(1, 2))  # [B]
    m = torch.where(bad[:, None, None], 0.0, m)
    try:
        nuc, polar = _polar_gram(m) if use_gram_eigh(m) else _polar_svd(m)
    except torch.linalg.LinAlgError as err:  # finite but did not converge (not seen in practice)
        raise RuntimeError(f"procrustes_loss: the SVD of X̄ᵀȲ did not converge: {err}") from None
    polar = torch.where(bad[:, None, None], torch.nan, polar)
    loss = (2 - 2 * torch.where(bad, torch.nan, nuc)).mean().to(student.dtype)
    return loss, (mu_x, s_x, mu_y, s_y, polar)


def use_gram_eigh(m: torch.Tensor) -> bool:
    """Whether the polar factor of M [B, Ds, Dt] comes from the float64 eigh of its small Gram
    matrix (:func:`_polar_gram`) rather than from the thin SVD (:func:`_polar_svd`): for
    float32 M whose sides differ by 2x or more (there LAPACK's eigh of the k x k Gram, k =
    min(Ds, Dt), even in float64, costs about 2/3 of the fp32 SVD of M; for square M it costs
    the same, so the SVD stays). float64 M always takes the SVD (no wider type for the Gram)."""
    k, big = sorted(m.shape[1:])
    return m.dtype == torch.float32 and 2 * k <= big


def _polar_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖M‖_*, Π) from the thin SVD M = UΣVᵀ: Π = U 1[σ > tol] Vᵀ, tol = σ_max·eps (docs/geometry.md §7)."""
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    tol = sv[:, :1] * torch.finfo(sv.dtype).eps  # only the SVD's noise floor: docs/geometry.md §7
    return sv.sum(dim=1), torch.bmm(u * (sv > tol).to(sv.dtype)[:, None, :], vh)


def _polar_gram(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖M‖_*, Π) of a float32 M from the eigendecomposition of its small Gram matrix in float64.

    With Ds <= Dt (else the transposed formulas): MMᵀ = UΛUᵀ, σ = √λ, and
    Π = U diag(1[σ > tol]/σ) Uᵀ M, tol = σ_max·eps(float32), the same noise floor as the fp32
    SVD. Squaring M squares its condition number, so the Gram and eigh run in float64: λ has
    absolute error ~eps64·σ_max², i.e. σ is resolved down to √eps64·σ_max ≈ 1.5e-8·σ_max, below
    the float32 tolerance. Measured against the exact polar factor of the same fp32 M this is
    more accurate than the fp32 SVD (docs/geometry.md §7)."""
    m64 = m.double()
    wide = m.shape[1] <= m.shape[2]
    gram = torch.bmm(m64, m64.transpose(1, 2)) if wide else torch.bmm(m64.transpose(1, 2), m64)
    lam, u = torch.linalg.eigh(gram)  # ascending
    sv = lam.clamp_min(0).sqrt()
    keep = sv > sv[:, -1:] * torch.finfo(m.dtype).eps
    inv = torch.where(keep, 1 / torch.where(keep, sv, torch.ones_like(sv)), torch.zeros_like(sv))
    if wide:  # U diag(inv) (Uᵀ M)
        polar = torch.bmm(u * inv[:, None, :], torch.bmm(u.transpose(1, 2), m64))
    else:  # (M V) diag(inv) Vᵀ with MᵀM = VΛVᵀ
        polar = torch.bmm(torch.bmm(m64, u) * inv[:, None, :], u.transpose(1, 2))
    return sv.sum(dim=1).to(m.dtype), polar.to(m.dtype)


def procrustes_backward(
    grad, student, teacher, mask, saved: Saved, center: bool, need_student: bool, need_teacher: bool
):
    """∂ℓ/∂X = (g − ⟨g, X̄⟩X̄)/s_x with g = −2k ȲΠᵀ (k = grad/B), on the unscaled X̃, Ỹ:

        G = Ỹ (k' Πᵀ),  k' = −2k/(s_x s_y)       (= g / s_x; the scalars go to the small Π)
        ∂ℓ/∂X = G − [s_x > EPS] (⟨G, X̃⟩ / s_x²) X̃

    and symmetrically for Y. The mask and centring steps of the preprocessing backward are
    exact no-ops here (G is 0 on dropped rows and has zero column sums: Ỹ is centred)."""
    mu_x, s_x, mu_y, s_y, polar = saved
    x, y, w, _ = _inputs(student, teacher, mask)
    k = (-2 * grad.to(x.dtype) / x.shape[0]) / (s_x * s_y)  # [B]
    k = k[:, None, None]
    xt = _apply_prep(x, w, mu_x, None, center, NONE)
    yt = _apply_prep(y, w, mu_y, None, center, NONE)
    out = []
    for need, z, other, zt, s, pi in (
        (need_student, student, yt, xt, s_x, polar.transpose(1, 2)),
        (need_teacher, teacher, xt, yt, s_y, polar),
    ):
        if not need:
            out.append(z.new_empty(0))
            continue
        g = torch.bmm(other, pi * k)
        r = s[:, None, None]
        dot = _bdot(g, zt)[:, None, None] / (r * r)
        g = g.addcmul_(zt, torch.where(r > EPS, -dot, torch.zeros_like(dot)))
        out.append(g.to(z.dtype).reshape(z.shape))
    return out[0], out[1]
