"""Triton geometry kernels (kd_kernels/triton/geometry.py) beyond the backend matrix of
tests/test_geometry.py: N spanning several row tiles and split-K programs, widths that are not a
multiple of the tile, B = 3 with ragged masks, Ds != Dt, fp16/bf16 under the 2x rule,
grad_output != 1, the raw products against float64, masked-out non-finite rows.

Under TRITON_INTERPRET=1 the "interpret" config has 32-wide D tiles, 16-row steps and 32 rows
per split-K program, so N = 150 is 10 row steps in 5 programs and D = 37 (or 21 + 34) spans
ragged column tiles."""

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
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, _, kw in CASES]
G = torch.tensor(0.37)  # grad_output != 1


def _ragged_mask(b: int, n: int, keeps: tuple[int, ...]) -> torch.Tensor:
    """[b, n] bool masks keeping keeps[i] random rows of item i."""
    m = torch.zeros(b, n, dtype=torch.bool)
    for i, k in enumerate(keeps):
        m[i, torch.randperm(n)[:k]] = True
    return m


def _inputs(kind: str, dtype=torch.float32, device="cpu"):
    """(student, teacher, mask): every shape is in the D x D form (N > max(Ds, Dt))."""
    if kind == "2d":
        s, t, m = torch.randn(150, 37), torch.randn(150, 23), None
    elif kind == "2d-masked":
        s, t = torch.randn(150, 37), torch.randn(150, 23)
        m = _ragged_mask(1, 150, (97,))[0]
    else:  # batched, ragged masks: one item nearly full, one small (still N_kept > D), one in between
        s, t = torch.randn(3, 120, 21), torch.randn(3, 120, 34)
        m = _ragged_mask(3, 120, (119, 41, 77))
    s, t = s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype).requires_grad_()
    return s, t, None if m is None else m.to(device)


def _fn(name: str, backend: str):
    f = getattr(kd_kernels, name)
    return lambda a, b, **kw: f(a, b, backend=backend, **kw)


@pytest.mark.parametrize("kind", ["2d", "2d-masked", "batched-ragged"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp32_matches_float64_reference(case, kind):
    name, ref, kw = case
    s, t, m = _inputs(kind, device=require("triton", name))
    got = value_and_grads(_fn(name, "triton"), s, t, grad_output=G, mask=m, **kw)
    want = value_and_grads(ref, s, t, grad_output=G.double(), dtype=torch.float64, mask=m, **kw)
    rtol, _ = tolerance(torch.float32, "triton")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for g, w, what in zip(got, want, ("value", "grad student", "grad teacher")):
        assert_close(g, w, rtol=rtol, atol=rtol / 10 * max(1.0, w.abs().max().item()), name=f"{name} {what}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_low_precision_2x_rule(case, dtype):
    name, ref, kw = case
    s, t, m = _inputs("batched-ragged", dtype, device=require("triton", name))
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


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dd_form_runs_the_kernels_not_the_torch_path(case, monkeypatch):
    """The D x D shapes must not fall back to kd_kernels.torch_impl (the N x N form does)."""
    from kd_kernels.torch_impl import geometry as T

    name, _, kw = case
    stem = name.removesuffix("_loss")

    def fail(*a, **k):
        raise AssertionError(f"{stem}: the triton backend called the torch path on a D x D shape")

    monkeypatch.setattr(T, f"{stem}_forward", fail)
    monkeypatch.setattr(T, f"{stem}_backward", fail)
    s, t, m = _inputs("2d-masked", device=require("triton", name))
    v, gs, gt = value_and_grads(_fn(name, "triton"), s, t, mask=m, **kw)
    assert torch.isfinite(v) and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_non_finite_in_masked_out_row_gives_nan(case, bad):
    """README "Non-finite input": masked-out rows still carry NaN/inf into the loss (the kernel
    multiplies rows by the mask in its loads instead of skipping them)."""
    name, _, kw = case
    s, t, m = _inputs("2d-masked", device=require("triton", name))
    row = int(torch.nonzero(~m)[0])
    s = s.clone()
    s[row, 3] = bad
    v, gs, _ = value_and_grads(_fn(name, "triton"), s, t, mask=m, **kw)
    assert not torch.isfinite(v), f"{name}: {bad} in masked-out row {row} gave the finite loss {v}"
    assert not torch.isfinite(gs).all()


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
def test_large_column_means_do_not_cancel(case):
    """Centring as a rank-1 correction of XᵀWX would lose ~eps·‖μ‖²/var in fp32 (here 1e-7·1e6);
    the kernels shift the rows by a kept row in the loads (forward) and centre them in the loads
    (backward), so fp32 keeps the table's tolerance with column means 1000x the spread."""
    name, ref, kw = case
    device = require("triton", name)
    s, t, m = _inputs("2d-masked", device=device)
    s = (s + 1000.0 * torch.randn(37, device=device)).detach()
    t = (t.detach() - 500.0 * torch.rand(23, device=device)).requires_grad_()
    got = value_and_grads(_fn(name, "triton"), s, t, grad_output=G, mask=m, **kw)
    want = value_and_grads(ref, s, t, grad_output=G.double(), dtype=torch.float64, mask=m, **kw)
    rtol, _ = tolerance(torch.float32, "triton")
    for g, w, what in zip(got, want, ("value", "grad student", "grad teacher")):
        assert_close(g, w, rtol=10 * rtol, atol=rtol * max(1.0, w.abs().max().item()), name=f"{name} {what}")
