"""Triton geometry kernels (kd_kernels/triton/geometry.py: D x D form; geometry_nn.py: N x N form;
procrustes.py) beyond the backend matrix of tests/test_geometry.py: N spanning several row tiles
and split-K programs, widths that are not a multiple of the tile, B = 3 with ragged masks (and
all-but-one-row masks), Ds != Dt, fp16/bf16 under the 2x rule, grad_output != 1, teacher with and
without grad, the raw products against float64, masked-out non-finite rows, Newton–Schulz vs SVD.

Under TRITON_INTERPRET=1 the "interpret" config of the D x D form has 32-wide D tiles, 16-row
steps and 32 rows per split-K program, so N = 150 is 10 row steps in 5 programs and D = 37 (or
21 + 34) spans ragged column tiles. The N x N form has 16 x 16 output tiles and 32 columns per
split-K program: N = 37 is 3 x 3 tiles (mirrored off-diagonal tiles), D = 50 / 41 two splits."""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels.reference import geometry as R
from kd_kernels.testing import (
    assert_close,
    assert_close_2x,
    low_precision_floor,
    require,
    tolerance,
    value_and_grads,
)

CASES = [
    *[("gram_loss", R.gram_loss, {"center": c, "normalize": nz}) for c in (True, False) for nz in (True, False)],
    ("cka_loss", R.cka_loss, {"unbiased": False}),
    ("cka_loss", R.cka_loss, {"unbiased": True}),
    ("relation_loss", R.relation_loss, {}),
    *[("procrustes_loss", R.procrustes_loss, {"center": c}) for c in (True, False)],
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, _, kw in CASES]
G = torch.tensor(0.37)  # grad_output != 1


def _ragged_mask(b: int, n: int, keeps: tuple[int, ...]) -> torch.Tensor:
    """[b, n] bool masks keeping keeps[i] random rows of item i."""
    m = torch.zeros(b, n, dtype=torch.bool)
    for i, k in enumerate(keeps):
        m[i, torch.randperm(n)[:k]] = True
    return m


DD_KINDS = ["2d", "2d-masked", "batched-ragged", "odd-97x33"]
NN_KINDS = ["nn-masked", "nn-tiny", "nn-batched-ragged"]


def _inputs(kind: str, dtype=torch.float32, device="cpu", teacher_grad=True):
    """(student, teacher, mask): the D x D form (N > max(Ds, Dt)) unless the kind starts with "nn"."""
    if kind == "2d":
        s, t, m = torch.randn(150, 37), torch.randn(150, 23), None
    elif kind == "2d-masked":
        s, t = torch.randn(150, 37), torch.randn(150, 23)
        m = _ragged_mask(1, 150, (97,))[0]
    elif kind == "batched-ragged":  # one item nearly full, one small (still N_kept > D), one in between
        s, t = torch.randn(3, 120, 21), torch.randn(3, 120, 34)
        m = _ragged_mask(3, 120, (119, 41, 77))
    elif kind == "odd-97x33":
        s, t, m = torch.randn(97, 33), torch.randn(97, 33), None
    elif kind == "nn-2d":  # N x N form: N <= max(Ds, Dt), 3 x 3 output tiles, 2 column splits
        s, t, m = torch.randn(37, 50), torch.randn(37, 41), None
    elif kind == "nn-masked":
        s, t = torch.randn(37, 50), torch.randn(37, 41)
        m = _ragged_mask(1, 37, (23,))[0]
    elif kind == "nn-tiny":  # N = 5, D = 64
        s, t, m = torch.randn(5, 64), torch.randn(5, 64), None
    elif kind == "nn-batched-ragged":  # item 0 drops exactly one row
        s, t = torch.randn(3, 30, 40), torch.randn(3, 30, 35)
        m = _ragged_mask(3, 30, (29, 6, 17))
    else:
        raise ValueError(kind)
    s = s.to(device=device, dtype=dtype)
    t = t.to(device=device, dtype=dtype).requires_grad_(teacher_grad)
    return s, t, None if m is None else m.to(device)


def _compare_fp32(name, got, want):
    rtol, _ = tolerance(torch.float32, "triton")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for g, w, what in zip(got, want, ("value", "grad student", "grad teacher")):
        assert_close(g, w, rtol=rtol, atol=rtol / 10 * max(1.0, w.abs().max().item()), name=f"{name} {what}")


def _fn(name: str, backend: str):
    f = getattr(kd_kernels, name)
    return lambda a, b, **kw: f(a, b, backend=backend, **kw)


@pytest.mark.parametrize("kind", DD_KINDS + NN_KINDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp32_matches_float64_reference(case, kind):
    name, ref, kw = case
    s, t, m = _inputs(kind, device=require("triton", name))
    got = value_and_grads(_fn(name, "triton"), s, t, grad_output=G, mask=m, **kw)
    want = value_and_grads(ref, s, t, grad_output=G.double(), dtype=torch.float64, mask=m, **kw)
    _compare_fp32(name, got, want)


@pytest.mark.parametrize("kind", ["nn-masked"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_teacher_without_grad(case, kind):
    """need_teacher = False: the student gradient alone, the teacher's left as None (the D x D
    form's student-only backward runs in tests/test_geometry.py's backend matrix)."""
    name, ref, kw = case
    s, t, m = _inputs(kind, device=require("triton", name), teacher_grad=False)
    got = value_and_grads(_fn(name, "triton"), s, t, grad_output=G, mask=m, **kw)
    want = value_and_grads(ref, s, t, grad_output=G.double(), dtype=torch.float64, mask=m, **kw)
    assert got[2] is None and want[2] is None
    _compare_fp32(name, got[:2], want[:2])


@pytest.mark.parametrize("kind", ["batched-ragged", "nn-batched-ragged"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_low_precision_2x_rule(case, dtype, kind):
    name, ref, kw = case
    s, t, m = _inputs(kind, dtype, device=require("triton", name))
    v, gs, gt = value_and_grads(_fn(name, "triton"), s, t, grad_output=G, mask=m, **kw)
    assert v.dtype == dtype and gs.dtype == dtype and gt.dtype == dtype
    want = value_and_grads(ref, s, t, grad_output=G.double(), dtype=torch.float64, mask=m, **kw)
    # the baseline: the PyTorch path in the same dtype (the N x N reference overflows fp16 at
    # N = 120: ⟨HKH, HLH⟩ sums N² terms of size ~D²)
    base = value_and_grads(_fn(name, "torch"), s, t, grad_output=G, mask=m, **kw)
    for got, w, b, what in zip((v, gs, gt), want, base, ("value", "grad student", "grad teacher")):
        floor = max(1e-3, 2 * low_precision_floor(dtype) * w.abs().max().item())
        assert_close_2x(got, w, b, name=f"{name} {what}", floor=floor)


def test_products_kernel_raw_statistics():
    """One streaming pass: XᵀWX, XᵀWY, YᵀWY, Σ w x, Σ w y and Σ w against float64, batched and
    masked, with several split-K programs adding into the same tiles."""
    from kd_kernels.triton import geometry as TG

    device = require("triton", "gram_loss")
    s, t, m = _inputs("batched-ragged", device=device)
    x, y, w = TG._views(s, t.detach(), m)
    cfg = TG._config()
    bd = cfg["BLOCK_D"]
    tiles = sum(-(-a // bd) * -(-b // bd) for a, b in ((21, 21), (21, 34), (34, 34)))
    assert TG._split(120, tiles, 3, cfg) < 120 or not TG.TRITON_INTERPRET  # > 1 program over N
    mxx, mxy, myy, csx, csy, cnt = TG._products(x, y, w, None, None)
    xd, yd, wd = x.double(), y.double(), m.double()[..., None]
    for got, want in (
        (mxx, (xd * wd).transpose(1, 2) @ xd),
        (mxy, (xd * wd).transpose(1, 2) @ yd),
        (myy, (yd * wd).transpose(1, 2) @ yd),
        (csx, (xd * wd).sum(dim=1)),
        (csy, (yd * wd).sum(dim=1)),
        (cnt, wd.sum(dim=(1, 2))),
    ):
        assert_close(got, want, rtol=2e-5, atol=1e-4)


def test_products_kernel_row_scaled():
    """relation's 'row' scaling in the loads: Σ w x_i x_iᵀ / r_i² with r from the row pass."""
    from kd_kernels.triton import geometry as TG

    device = require("triton", "relation_loss")
    s, t, m = _inputs("2d-masked", device=device)
    x, y, w = TG._views(s, t.detach(), m)
    rx = TG._row_sq(x, w, None)
    xd, wd = x.double(), m.double().reshape(1, -1, 1)
    assert_close(rx, (xd.square().sum(dim=2) * wd[..., 0]), rtol=2e-5, atol=1e-5)
    rinv_x = 1 / rx.sqrt().clamp_min(1e-12)
    rinv_y = 1 / TG._row_sq(y, w, None).sqrt().clamp_min(1e-12)
    mxx = TG._products(x, y, w, rinv_x, rinv_y)[0]
    xn = torch.nn.functional.normalize(xd, dim=2) * wd
    assert_close(mxx, xn.transpose(1, 2) @ xn, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["2d-masked", "nn-masked"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_both_forms_run_the_kernels_not_the_torch_path(case, kind, monkeypatch):
    """Neither form may fall back to kd_kernels.torch_impl's forward / backward (Procrustes uses
    only its polar-factor helpers there)."""
    from kd_kernels.torch_impl import geometry as T

    name, _, kw = case
    stem = name.removesuffix("_loss")

    def fail(*a, **k):
        raise AssertionError(f"{stem}: the triton backend called the torch path ({kind})")

    monkeypatch.setattr(T, f"{stem}_forward", fail)
    monkeypatch.setattr(T, f"{stem}_backward", fail)
    s, t, m = _inputs(kind, device=require("triton", name))
    v, gs, gt = value_and_grads(_fn(name, "triton"), s, t, mask=m, **kw)
    assert torch.isfinite(v) and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize(
    ("kind", "bad"), [("2d-masked", float("nan")), ("2d-masked", float("inf")), ("nn-masked", float("inf"))]
)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_non_finite_in_masked_out_row_gives_nan(case, kind, bad):
    """README "Non-finite input": masked-out rows still carry NaN/inf into the loss (the kernel
    multiplies rows by the mask in its loads instead of skipping them)."""
    name, _, kw = case
    s, t, m = _inputs(kind, device=require("triton", name))
    row = int(torch.nonzero(~m)[0])
    s = s.clone()
    s[row, 3] = bad
    v, gs, _ = value_and_grads(_fn(name, "triton"), s, t, mask=m, **kw)
    assert not torch.isfinite(v), f"{name}: {bad} in masked-out row {row} gave the finite loss {v}"
    assert not torch.isfinite(gs).all()


def test_nn_products_kernel_raw_statistics():
    """The N x N pass: W X'X'ᵀ W, W Y'Y'ᵀ W (rows shifted by c), Σ w x', Σ w y', Σ w against float64,
    batched and masked, with mirrored off-diagonal tiles and several split-K programs per tile."""
    from kd_kernels.triton import geometry as TG
    from kd_kernels.triton import geometry_nn as NN

    device = require("triton", "gram_loss")
    s, t, m = _inputs("nn-batched-ragged", device=device)
    x, y, w = TG._views(s, t.detach(), m)
    for shift in (None, TG._shifts(x, y, w)):
        k, l_, csx, csy, cnt = NN._nn_products(x, y, w, shift)
        xd, yd, wd = x.double(), y.double(), m.double()[..., None]
        if shift is not None:
            xd, yd = xd - shift[0].double()[:, None], yd - shift[1].double()[:, None]
        xd, yd = xd * wd, yd * wd
        for got, want in (
            (k, xd @ xd.transpose(1, 2)),
            (l_, yd @ yd.transpose(1, 2)),
            (csx, xd.sum(dim=1)),
            (csy, yd.sum(dim=1)),
            (cnt, wd.sum(dim=(1, 2))),
        ):
            assert_close(got, want, rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize("shape", ["well", "rank-deficient", "spread"])
def test_newton_schulz_matches_svd(shape):
    """polar_newton_schulz against the float64 SVD of the same fp32 M: ‖M‖_* to 1e-5 relative and
    Π to 1e-4 on the resolved directions; rank-deficient M (N < D) keeps its null space out of Π
    (on the null directions, ΠV₀ stays at rounding level)."""
    from kd_kernels.triton.procrustes import polar_newton_schulz

    b, ds, dt = 2, 48, 72
    u, _ = torch.linalg.qr(torch.randn(b, ds, ds, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(b, dt, dt, dtype=torch.float64))
    k = min(ds, dt)
    sv = {
        "well": torch.linspace(1, 0.3, k, dtype=torch.float64),
        "rank-deficient": torch.cat(
            [torch.rand(20, dtype=torch.float64) + 0.1, torch.zeros(k - 20, dtype=torch.float64)]
        ),
        "spread": torch.logspace(0, -4, k, dtype=torch.float64),
    }[shape]
    m = ((u[:, :, :k] * sv) @ v[:, :, :k].transpose(1, 2)).float()
    nuc, polar = polar_newton_schulz(m)
    uu, ss, vh = torch.linalg.svd(m.double(), full_matrices=False)
    assert_close(nuc, ss.sum(dim=1), rtol=1e-5, atol=1e-6, name="nuclear norm")
    r = 20 if shape == "rank-deficient" else k  # the resolved directions
    # Π on the resolved directions: Π v_i = u_i
    assert_close(polar.double() @ vh[:, :r].transpose(1, 2), uu[:, :, :r], rtol=0, atol=1e-4, name="polar factor")
    if shape != "rank-deficient":
        assert_close(polar, uu @ vh, rtol=0, atol=1e-4, name="polar factor")
    else:  # the fp32 "zeros" are rounding noise (~1e-8): Π may act on them (so does the SVD's
        # tolerance, eps·σ_max); it stays a contraction there, and the loss gradient never sees
        # those directions (docs/geometry.md §7, rank handling)
        assert torch.linalg.matrix_norm(polar.double(), ord=2).max() < 1 + 1e-4


@pytest.mark.parametrize("kind", ["2d-masked", "nn-masked", "nn-batched-ragged"])
@pytest.mark.parametrize("center", [True, False])
def test_procrustes_newton_schulz_path_matches_reference(kind, center, monkeypatch):
    """The Newton–Schulz polar factor end to end (forced at small D): value and gradients as the
    SVD path's, against float64; N < D included (rank-deficient M)."""
    from kd_kernels.triton import procrustes as P

    monkeypatch.setattr(P, "NS_MIN_DIM", 0)
    s, t, m = _inputs(kind, device=require("triton", "procrustes_loss"))
    got = value_and_grads(_fn("procrustes_loss", "triton"), s, t, grad_output=G, mask=m, center=center)
    want = value_and_grads(R.procrustes_loss, s, t, grad_output=G.double(), dtype=torch.float64, mask=m, center=center)
    _compare_fp32("procrustes_loss (Newton–Schulz)", got, want)


def test_split_sizes_cover_n():
    """The GPU split-K sizing: rows per program a multiple of BLOCK_N and the programs cover N."""
    from kd_kernels.triton.geometry import GEOMETRY_CONFIGS, _split

    cfg = GEOMETRY_CONFIGS["gpu"]
    for n, tiles, b in ((65536, 3, 1), (4097, 48, 8), (100, 1000, 2), (33, 1, 1)):
        rows = _split(n, tiles, b, cfg)
        assert rows % cfg["BLOCK_N"] == 0 and rows > 0
        programs = -(-n // rows)
        assert programs * rows >= n and (programs - 1) * rows < n
        if n >= 4096 and tiles * b < 64:
            assert programs > 1, f"N={n}, {tiles} tiles x B={b}: no split-K"


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c[2].get("center", True) and c[0] != "relation_loss"],
    ids=[i for c, i in zip(CASES, IDS) if c[2].get("center", True) and c[0] != "relation_loss"],
)
@pytest.mark.parametrize("kind", ["2d-masked", "nn-masked"])
def test_large_column_means_do_not_cancel(case, kind):
    """Centring as a rank-1 correction of XᵀWX would lose ~eps·‖μ‖²/var in fp32 (here 1e-7·1e6);
    the kernels shift the rows by a kept row in the loads (forward) and centre them in the loads
    (backward), so fp32 keeps the table's tolerance with column means 1000x the spread."""
    name, ref, kw = case
    device = require("triton", name)
    s, t, m = _inputs(kind, device=device)
    s = (s + 1000.0 * torch.randn(s.shape[-1], device=device)).detach()
    t = (t.detach() - 500.0 * torch.rand(t.shape[-1], device=device)).requires_grad_()
    got = value_and_grads(_fn(name, "triton"), s, t, grad_output=G, mask=m, **kw)
    want = value_and_grads(ref, s, t, grad_output=G.double(), dtype=torch.float64, mask=m, **kw)
    rtol, _ = tolerance(torch.float32, "triton")
    for g, w, what in zip(got, want, ("value", "grad student", "grad teacher")):
        assert_close(g, w, rtol=10 * rtol, atol=rtol * max(1.0, w.abs().max().item()), name=f"{name} {what}")
