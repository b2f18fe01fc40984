"""Contract of the CUDA C++ geometry primitives of kd_kernels._C (csrc/cuda/geometry.cu) and of
their Python launchers (kd_kernels/ops/geometry_cuda.py).

- GPU tests (skip "needs a CUDA device and kd_kernels._C"): geometry_products_cuda,
  geometry_grad_cuda and geometry_row_sq_cuda against their float64 formulas (the emulations
  below, which spell the contract), every dtype, masks, shifts, row scales, odd shapes across
  several 64-wide tiles and split-K blocks; the precision switch; argument errors; NaN in a masked
  row reaching the products. The losses' values against the reference run in the backend matrix
  (tests/test_geometry.py, backend="cuda").
- CPU tests: the launchers' glue (the shared D x D epilogue of kd_kernels/triton/geometry.py
  called with prims=, and the CUDA Procrustes launcher) with the C++ primitives replaced by the
  emulations, against the torch path in float64.
"""

from __future__ import annotations

import pytest
import torch

from kd_kernels.ops import geometry_cuda as GC
from kd_kernels.torch_impl import geometry as T

NAMES = ("geometry_products_cuda", "geometry_grad_cuda", "geometry_row_sq_cuda")
SKIP = "needs a CUDA device and kd_kernels._C"


# ------------------------------------------------------------- the contract, in float64 torch


def _given(t):
    return t is not None and t.numel() > 0


def _keep(x, w):
    return torch.ones(x.shape[:2], dtype=torch.float64, device=x.device) if not _given(w) else (w != 0).double()


def emu_products(x, y, w, rinv_x, rinv_y, shift_x, shift_y, precision=None):
    """(XᵀWX, XᵀWY, YᵀWY, Σ w x', Σ w y', Σ w) fp32 with x' = (x − shift_x) · rinv_x."""
    f = _keep(x, w)
    fx = f * rinv_x.double() if _given(rinv_x) else f
    fy = f * rinv_y.double() if _given(rinv_y) else f
    xs = x.double() - (shift_x.double()[:, None, :] if _given(shift_x) else 0)
    ys = y.double() - (shift_y.double()[:, None, :] if _given(shift_y) else 0)
    xs, ys = xs * fx[..., None], ys * fy[..., None]
    out = (xs.mT @ xs, xs.mT @ ys, ys.mT @ ys, xs.sum(1), ys.sum(1), f.sum(1))
    return tuple(t.float() for t in out)


def emu_grad(a, v, w, ra, rv, p, q, mu_a, mu_v, out_f32, precision=None):
    """W ((A − 1μ_aᵀ) P + (V − 1μ_vᵀ) Q), rows times ra / rv; masked rows 0 · (…)."""
    keep = _keep(a, w)

    def side(z, r, mu):
        z = z.double() - (mu.double()[:, None, :] if _given(mu) else 0)
        z = z * (r.double()[..., None] if _given(r) else 1)
        return torch.where(keep[..., None] > 0, z, torch.zeros_like(z))

    out = (side(a, ra, mu_a) @ p.double() + side(v, rv, mu_v) @ q.double()) * keep[..., None]
    return out.to(torch.float32 if out_f32 else a.dtype)


def emu_row_sq(x, w, mu):
    z = x.double() - (mu.double()[:, None, :] if _given(mu) else 0)
    return (z.square().sum(2) * _keep(x, w)).float()


# ------------------------------------------------------------------------------------ GPU


def _ext():
    from kd_kernels.testing import require_extension

    return require_extension()


def test_functions_exist_in_the_extension():
    ext = _ext()
    missing = [n for n in NAMES if not hasattr(ext, n)]
    assert not missing, f"kd_kernels._C lacks {missing}"


@pytest.fixture
def C():
    if not torch.cuda.is_available():
        pytest.skip(f"{SKIP} (no CUDA device)")
    return _ext()


def _rel(got, ref):
    ref = ref.double()
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _rows(b, n, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(b, n, d, device="cuda", generator=g) + 0.5).to(dtype)


# rel. error bound vs the float64 formula of the same (rounded) inputs: fp32 under 3xTF32, fp16/bf16
# products (exact in the fp32 accumulators), fp32 operands of scaled / backward tiles under 3xTF32
TOL = {"tf32x3": 2e-5, "tf32": 5e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["plain", "mask", "shift", "rowscale"])
@pytest.mark.parametrize("shape", [(2, 300, 70, 33), (1, 17, 5, 129), (3, 1000, 64, 64)], ids=str)
def test_products_match_the_formula(C, dtype, variant, shape):
    b, n, ds, dt = shape
    x, y = _rows(b, n, ds, dtype, 1), _rows(b, n, dt, dtype, 2)
    e = torch.empty(0, device="cuda")
    w = rx = ry = sx = sy = e
    if variant == "mask":
        w = (torch.rand(b, n, device="cuda") > 0.3).to(torch.int8)
    if variant == "shift":
        sx, sy = x[:, 0].float().contiguous(), y[:, 0].float().contiguous()
    if variant == "rowscale":
        rx, ry = 1 / x.float().norm(dim=2), 1 / y.float().norm(dim=2)
    got = C.geometry_products_cuda(x, y, w, rx, ry, sx, sy, "tf32x3")
    ref = emu_products(x, y, w, rx, ry, sx, sy)
    for name, g, r in zip(("mxx", "mxy", "myy", "csx", "csy", "cnt"), got, ref, strict=True):
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        assert _rel(g, r) < TOL["tf32x3"], (name, _rel(g, r))
    assert torch.equal(got[5], ref[5])  # the kept-row count is exact


@pytest.mark.gpu
def test_products_precision_switch_and_strided_rows(C):
    x, y = _rows(2, 513, 96, torch.float32, 3), _rows(2, 513, 40, torch.float32, 4)
    xs = torch.cat([x, x], dim=2)[:, :, :96]  # row stride 192: strided, unit feature stride
    e = torch.empty(0, device="cuda")
    ref = emu_products(x, y, e, e, e, e, e)
    err = {}
    for prec in ("tf32x3", "tf32"):
        got = C.geometry_products_cuda(xs, y, e, e, e, e, e, prec)
        err[prec] = max(_rel(g, r) for g, r in zip(got, ref, strict=True))
        assert err[prec] < TOL[prec], (prec, err)
    assert err["tf32x3"] < err["tf32"] / 8, err  # 3xTF32 is much closer than one TF32 pass


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["plain", "mask+center", "rowscale", "one-sided"])
@pytest.mark.parametrize("out_f32", [True, False])
def test_grad_gemm_matches_the_formula(C, dtype, variant, out_f32):
    b, n, da, dv, dout = 2, 131, 70, 33, 70
    a, v = _rows(b, n, da, dtype, 5), _rows(b, n, dv, dtype, 6)
    if variant == "one-sided":
        v = v[:, :, :0]
    p = torch.randn(b, da, dout, device="cuda")
    q = torch.randn(b, v.shape[2], dout, device="cuda").mT.contiguous().mT  # non-contiguous: copied
    e = torch.empty(0, device="cuda")
    w = ra = rv = mu_a = mu_v = e
    if variant == "mask+center":
        w = (torch.rand(b, n, device="cuda") > 0.4).to(torch.int8)
        mu_a, mu_v = a.float().mean(1), v.float().mean(1)
    if variant == "rowscale":
        ra, rv = 1 / a.float().norm(dim=2), 1 / v.float().norm(dim=2)
    if variant == "one-sided":
        mu_a = a.float().mean(1)
    got = C.geometry_grad_cuda(a, v, w, ra, rv, p, q, mu_a, mu_v, out_f32, "tf32x3")
    ref = emu_grad(a, v, w, ra, rv, p, q, mu_a, mu_v, True)
    assert got.shape == (b, n, dout) and got.is_contiguous()
    assert got.dtype == (torch.float32 if out_f32 else dtype)
    tol = TOL["tf32x3"] if out_f32 or dtype == torch.float32 else {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert _rel(got, ref) < tol, _rel(got, ref)
    if _given(w):
        assert (got[w == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_sq_matches_the_formula(C, dtype):
    x = _rows(3, 77, 45, dtype, 7)
    w = (torch.rand(3, 77, device="cuda") > 0.5).to(torch.int8)
    mu = x.float().mean(1)
    e = torch.empty(0, device="cuda")
    for ww, m in ((e, e), (w, mu)):
        got = C.geometry_row_sq_cuda(x, ww, m)
        assert got.dtype == torch.float32 and got.shape == (3, 77)
        assert _rel(got, emu_row_sq(x, ww, m)) < 1e-5


@pytest.mark.gpu
def test_nan_in_a_masked_row_reaches_the_products(C):
    x, y = _rows(1, 100, 8, torch.float32, 8), _rows(1, 100, 8, torch.float32, 9)
    x[0, 3, 2] = float("nan")
    w = torch.ones(1, 100, dtype=torch.int8, device="cuda")
    w[0, 3] = 0
    e = torch.empty(0, device="cuda")
    mxx, mxy, *_ = C.geometry_products_cuda(x, y, w, e, e, e, e, "tf32x3")
    assert mxx.isnan().any() and mxy.isnan().any()  # as x · w on the torch path


@pytest.mark.gpu
def test_bad_arguments_raise_named_errors(C):
    x, y = _rows(1, 10, 4, torch.float32, 0), _rows(1, 10, 3, torch.float32, 1)
    e = torch.empty(0, device="cuda")
    with pytest.raises(RuntimeError, match="precision"):
        C.geometry_products_cuda(x, y, e, e, e, e, e, "ieee")
    with pytest.raises(RuntimeError, match="CUDA"):
        C.geometry_products_cuda(x.cpu(), y.cpu(), e.cpu(), e.cpu(), e.cpu(), e.cpu(), e.cpu(), "tf32x3")
    with pytest.raises(RuntimeError, match="y must have x's"):
        C.geometry_products_cuda(x, y[:, :9], e, e, e, e, e, "tf32x3")
    with pytest.raises(RuntimeError, match="w must have shape"):
        C.geometry_products_cuda(x, y, torch.ones(1, 9, device="cuda"), e, e, e, e, "tf32x3")
    with pytest.raises(RuntimeError, match="rinv_x and rinv_y"):
        C.geometry_products_cuda(x, y, e, torch.ones(1, 10, device="cuda"), e, e, e, "tf32x3")
    with pytest.raises(RuntimeError, match="float64"):
        C.geometry_products_cuda(x.double(), y.double(), e, e, e, e, e, "tf32x3")
    with pytest.raises(RuntimeError, match="3-D"):
        C.geometry_row_sq_cuda(x[0], e, e)
    p = torch.zeros(1, 4, 5, device="cuda")
    with pytest.raises(RuntimeError, match="q must have shape"):
        C.geometry_grad_cuda(x, y, e, e, e, p, torch.zeros(1, 4, 5, device="cuda"), e, e, True, "tf32x3")


# ------------------------------------------------------------- CPU: the launchers' glue


@pytest.fixture
def emulated(monkeypatch):
    """geometry_cuda's C++ functions replaced by their float64 emulations (CPU tensors)."""
    monkeypatch.setattr(GC, "_c_products", emu_products)
    monkeypatch.setattr(GC, "_c_grad", emu_grad)
    monkeypatch.setattr(GC, "_c_row_sq", emu_row_sq)


GLUE_CASES = [
    ("gram", {"center": True, "normalize": True}),
    ("gram", {"center": False, "normalize": False}),
    ("cka", {"unbiased": False}),
    ("cka", {"unbiased": True}),
    ("relation", {}),
    ("procrustes", {"center": True}),
    ("procrustes", {"center": False}),
]


def _grads_torch(loss, s, t, mask, g, flags):
    fwd, bwd = getattr(T, f"{loss}_forward"), getattr(T, f"{loss}_backward")
    value, saved = fwd(s, t, mask, *flags.values())
    return value, bwd(g, s, t, mask, saved, *flags.values(), True, True)


def _grads_cuda(loss, s, t, mask, g, flags):
    out = getattr(GC, f"{loss}_fwd_cuda")(s, t, mask, *flags.values())
    return out[0], getattr(GC, f"{loss}_bwd_cuda")(g, s, t, mask, *out[1:], *flags.values(), True, True)


@pytest.mark.parametrize(("loss", "flags"), GLUE_CASES, ids=[f"{c[0]}-{c[1]}" for c in GLUE_CASES])
@pytest.mark.parametrize("masked", [False, True])
def test_launchers_match_the_torch_path(emulated, loss, flags, masked):
    torch.manual_seed(0)
    s64, t64 = torch.randn(2, 23, 5, dtype=torch.float64) + 3, torch.randn(2, 23, 7, dtype=torch.float64) - 2
    mask = (torch.rand(2, 23) > 0.3) if masked else None
    g = torch.tensor(0.37)
    v_ref, (gs_ref, gt_ref) = _grads_torch(loss, s64, t64, mask, g.double(), flags)
    v, (gs, gt) = _grads_cuda(loss, s64.float(), t64.float(), mask, g, flags)
    assert v.dtype == torch.float32 and gs.dtype == gt.dtype == torch.float32
    assert gs.shape == s64.shape and gt.shape == t64.shape
    torch.testing.assert_close(v.double(), v_ref, rtol=1e-4, atol=1e-5)
    for got, ref in ((gs, gs_ref), (gt, gt_ref)):
        scale = ref.abs().max()
        torch.testing.assert_close(got.double() / scale, ref / scale, rtol=1e-4, atol=1e-4)


def test_procrustes_launcher_saved_layout_and_one_sided_grads(emulated):
    s, t = torch.randn(2, 19, 6), torch.randn(2, 19, 4)
    out = GC.procrustes_fwd_cuda(s, t, None, True)
    loss, mu_x, s_x, mu_y, s_y, polar = out
    assert loss.shape == () and mu_x.shape == (2, 6) and s_x.shape == (2,) and polar.shape == (2, 6, 4)
    assert mu_y.shape == (2, 4) and s_y.shape == (2,) and polar.dtype == torch.float32
    gs, gt = GC.procrustes_bwd_cuda(torch.tensor(1.0), s, t, None, *out[1:], True, False, True)
    assert gs.numel() == 0 and gt.shape == t.shape


def test_procrustes_launcher_non_finite_input_gives_nan(emulated):
    s, t = torch.randn(1, 12, 3), torch.randn(1, 12, 2)
    s[0, 4, 1] = float("inf")
    loss = GC.procrustes_fwd_cuda(s, t, None, True)[0]
    assert loss.isnan()
