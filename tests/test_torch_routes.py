"""The size routes of the PyTorch path (kd_kernels/torch_impl) against the float64 reference, on
both sides of every threshold: values and gradients (student and teacher), grad_output != 1.

* RKD distance: the dense single-block route (rows per block >= N, the default for
  N^2 <= 2^23) and the blockwise route (forced with ``block_rows`` < N, and by default above
  the threshold, checked here by shrinking the block budget), with near-duplicate and exactly
  duplicated rows so that the explicit near-pair path runs in both routes.
* The CPU L1-cdist backward of SinKD (ATen on CPU tensors) against the tiled one used on other
  devices, and the rewritten SinKD reverse recurrence against autograd through the reference.
"""

from __future__ import annotations

import pytest
import torch

from kd_kernels.reference import rkd as ref_rkd
from kd_kernels.reference import sinkhorn as ref_sink
from kd_kernels.torch_impl import rkd as impl
from kd_kernels.torch_impl import sinkhorn as sink_impl

F64 = torch.float64


def _rkd_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, 9, generator=g)
    t = torch.randn(n, 7, generator=g)
    s[3] = s[1] + 1e-6 * torch.randn(9, generator=g)  # near pair (explicit route)
    t[5] = t[2]  # exact duplicate in the teacher only
    return s, t


def _grad_output(n: int, reduction: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if reduction == "none":
        return torch.rand(n, n, generator=g, dtype=F64) * 2 - 0.5
    return torch.tensor(1.7, dtype=F64)


def _reference(s, t, reduction, go):
    s64, t64 = s.to(F64).requires_grad_(), t.to(F64).requires_grad_()
    out = ref_rkd.rkd_distance_loss(s64, t64, reduction=reduction)
    out.backward(go)
    return out.detach(), s64.grad, t64.grad


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 2e-4) -> None:
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.to(F64) - expected).abs().max()
    assert err <= rtol * scale, f"{name}: max abs err {err:.3e} > {rtol} x {scale:.3e}"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("block_rows", [None, 64, 40, 39, 7])  # None / >= N: dense; < N: blockwise
def test_rkd_distance_routes_match_float64_reference(reduction, block_rows):
    n = 40
    s, t = _rkd_inputs(n)
    go = _grad_output(n, reduction)
    value, mu_s, mu_t = impl.rkd_distance_fwd(s, t, reduction, block_rows=block_rows)
    gs, gt = impl.rkd_distance_bwd(go.float(), s, t, mu_s, mu_t, reduction, True, True, block_rows=block_rows)
    rv, rgs, rgt = _reference(s, t, reduction, go)
    _close(value, rv, f"value ({reduction}, block_rows={block_rows})")
    _close(gs, rgs, f"grad student ({reduction}, block_rows={block_rows})")
    _close(gt, rgt, f"grad teacher ({reduction}, block_rows={block_rows})")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_rkd_distance_dense_and_blockwise_agree_in_float64(reduction):
    """Both routes compute the same thing: float64 agreement to rounding, one side needed only."""
    n = 33
    s, t = (x.to(F64) for x in _rkd_inputs(n, seed=3))
    go = _grad_output(n, reduction)
    dense = impl.rkd_distance_fwd(s, t, reduction)
    block = impl.rkd_distance_fwd(s, t, reduction, block_rows=5)
    torch.testing.assert_close(dense[0], block[0], rtol=1e-12, atol=1e-14)
    for need_s, need_t in ((True, False), (False, True)):
        gd = impl.rkd_distance_bwd(go, s, t, dense[1], dense[2], reduction, need_s, need_t)
        gb = impl.rkd_distance_bwd(go, s, t, block[1], block[2], reduction, need_s, need_t, block_rows=5)
        for a, b in zip(gd, gb):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_rkd_distance_default_threshold(monkeypatch):
    """The default picks dense at N^2 <= budget and blockwise above it (budget shrunk to 2^10)."""
    monkeypatch.setattr(impl, "_DIST_BLOCK_ELEMS", 1 << 10)
    for n in (32, 33):  # 32 * 32 = 2^10: dense; 33: blockwise (31 rows per block)
        assert (impl._block_rows(n, None) >= n) == (n == 32)
        s, t = _rkd_inputs(n, seed=n)
        go = _grad_output(n, "mean")
        value, mu_s, mu_t = impl.rkd_distance_fwd(s, t, "mean")
        gs, gt = impl.rkd_distance_bwd(go.float(), s, t, mu_s, mu_t, "mean", True, True)
        rv, rgs, rgt = _reference(s, t, "mean", go)
        _close(value, rv, f"value N={n}")
        _close(gs, rgs, f"grad student N={n}")
        _close(gt, rgt, f"grad teacher N={n}")


def test_rkd_distance_dense_route_nonfinite():
    s, t = _rkd_inputs(12)
    s[4, 0] = float("nan")
    value, mu_s, mu_t = impl.rkd_distance_fwd(s, t, "mean")
    gs, _ = impl.rkd_distance_bwd(torch.tensor(1.0), s, t, mu_s, mu_t, "mean", True, False)
    assert not torch.isfinite(value)
    assert not torch.isfinite(gs).all()


@pytest.mark.parametrize("need", [(True, False), (False, True), (True, True)])
def test_l1_cdist_backward_cpu_matches_tiled(need, monkeypatch):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(9, 13, generator=g, dtype=F64).softmax(1)
    q = torch.rand(9, 13, generator=g, dtype=F64).softmax(1)
    q[2] = p[4]  # sign(0) = 0 entries
    grad = torch.randn(9, 9, generator=g, dtype=F64)
    cpu = sink_impl._l1_cdist_bwd(grad, p, q, *need)
    p_ = p.requires_grad_()
    q_ = q.clone().requires_grad_()
    (torch.cdist(p_, q_, p=1) * grad).sum().backward()
    for got, want, on in ((cpu[0], p_.grad, need[0]), (cpu[1], q_.grad, need[1])):
        assert (got is not None) == on
        if on:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("b,c,n_iters", [(1, 4, 3), (6, 11, 20), (17, 5, 7)])
def test_sinkhorn_loss_recurrence_matches_autograd(b, c, n_iters):
    g = torch.Generator().manual_seed(b)
    zs = torch.randn(b, c, generator=g, dtype=F64)
    zt = torch.randn(b, c, generator=g, dtype=F64)
    loss, cost, u, v = sink_impl.sinkhorn_loss_fwd(zs, zt, 2.0, 0.1, n_iters)
    go = torch.tensor(-0.7, dtype=F64)
    gs, gt = sink_impl.sinkhorn_loss_bwd(go, zs, zt, cost, u, v, 2.0, 0.1, True, True)
    zs_, zt_ = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    ref = ref_sink.sinkhorn_loss(zs_, zt_, temperature=2.0, epsilon=0.1, n_iters=n_iters)
    ref.backward(go)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs, zs_.grad, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(gt, zt_.grad, rtol=1e-8, atol=1e-11)


# --------------------------------------------------------------------------- feature geometry

from kd_kernels import testing as _kt
from kd_kernels.reference import geometry as ref_geo
from kd_kernels.torch_impl import geometry as geo_impl


def _geo_pair(shape_s, shape_t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape_s, generator=g, dtype=F64), torch.randn(shape_t, generator=g, dtype=F64)


def _procrustes_impl(s, t, mask, center, go):
    """Value and (student, teacher) gradients of the torch path called directly, in float32."""
    loss, saved = geo_impl.procrustes_forward(s.float(), t.float(), mask, center)
    gs, gt = geo_impl.procrustes_backward(go.float(), s.float(), t.float(), mask, saved, center, True, True)
    return loss, gs, gt


def _procrustes_reference(s, t, mask, center, go):
    s64, t64 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = ref_geo.procrustes_loss(s64, t64, center=center, mask=mask)
    out.backward(go)
    return out.detach(), s64.grad, t64.grad


# (student shape, teacher shape, mask?): sides differing by >= 2x (the float64 Gram-eigh route),
# both orientations, batched, masked, N <= D (rank-deficient M: zero singular values dropped).
_GRAM_EIGH_CASES = {
    "wide-teacher": ((40, 8), (40, 24), False),
    "wide-student": ((40, 24), (40, 8), False),
    "batched-masked": ((3, 30, 6), (3, 30, 16), True),
    "rank-deficient": ((7, 12), (7, 30), False),
    "rank-deficient-batched-masked": ((2, 9, 10), (2, 9, 20), True),
}


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("case", list(_GRAM_EIGH_CASES))
def test_procrustes_gram_eigh_route_matches_float64_reference(case, center):
    shape_s, shape_t, masked = _GRAM_EIGH_CASES[case]
    s, t = _geo_pair(shape_s, shape_t)
    with torch.no_grad():  # duplicated rows: repeated rows in both networks
        s[..., 3, :], t[..., 3, :] = s[..., 0, :], t[..., 0, :]
    mask = None
    if masked:
        mask = torch.ones(shape_s[:-1], dtype=torch.bool)
        mask[..., 1] = False
        mask[0, -1] = False
    m = torch.zeros(1, shape_s[-1], shape_t[-1])
    assert geo_impl.use_gram_eigh(m)  # the route under test
    go = torch.tensor(1.7, dtype=F64)
    got = _procrustes_impl(s, t, mask, center, go)
    want = _procrustes_reference(s, t, mask, center, go)
    rtol, _ = _kt.tolerance(torch.float32)
    for a, e, name in zip(got, want, ("value", "grad student", "grad teacher")):
        _close(a, e, f"{case}: {name}", rtol=rtol)


def test_procrustes_gram_eigh_and_svd_routes_agree():
    # The same float32 problem through both polar-factor routes: equal to rounding.
    s, t = _geo_pair((64, 16), (64, 48))
    x, y = s.float(), t.float()
    m = torch.bmm((x - x.mean(0)).T[None], (y - y.mean(0))[None])
    m = m / torch.linalg.matrix_norm(m)
    nuc_e, pol_e = geo_impl._polar_gram(m)
    nuc_s, pol_s = geo_impl._polar_svd(m)
    _close(nuc_e, nuc_s.double(), "nuclear norm", rtol=1e-5)
    _close(pol_e, pol_s.double(), "polar factor", rtol=1e-4)


def test_procrustes_gram_eigh_ill_conditioned_fp32_gradient():
    # As test_geometry's SVD-route regression, with Ds = Dt / 2 so the Gram-eigh route runs:
    # singular values of X̄ᵀȲ over 1 … 1e-5 must all be kept (each carries an O(1) gradient term).
    n, ds, dt = 400, 32, 64
    g = torch.Generator().manual_seed(3)
    y = torch.randn(n, dt, generator=g, dtype=F64)
    u = torch.linalg.svd(y - y.mean(0), full_matrices=False)[0][:, :ds]
    rot = torch.linalg.qr(torch.randn(ds, ds, generator=g, dtype=F64))[0]
    x = u @ torch.diag(torch.logspace(0, -5, ds, dtype=F64)) @ rot
    go = torch.tensor(1.0, dtype=F64)
    got = _procrustes_impl(x, y, None, True, go)
    want = _procrustes_reference(x, y, None, True, go)
    for a, e in zip(got[1:], want[1:]):
        assert (a.double() - e).norm() < 1e-2 * e.norm()


def test_procrustes_float64_keeps_the_svd_route():
    assert not geo_impl.use_gram_eigh(torch.zeros(1, 8, 32, dtype=F64))
    assert not geo_impl.use_gram_eigh(torch.zeros(1, 16, 16))  # square: the SVD is as cheap
    assert geo_impl.use_gram_eigh(torch.zeros(1, 32, 16))


def test_procrustes_gram_eigh_route_nonfinite():
    s, t = _geo_pair((3, 20, 6), (3, 20, 16))
    s[1, 4, 2] = float("nan")
    loss, saved = geo_impl.procrustes_forward(s.float(), t.float(), None, True)
    assert torch.isnan(loss)
    polar = saved[-1]
    assert torch.isnan(polar[1]).all() and torch.isfinite(polar[0]).all() and torch.isfinite(polar[2]).all()


_GEO_KINDS = {  # name -> (forward, backward, flags, reference call)
    "gram": (
        geo_impl.gram_forward,
        geo_impl.gram_backward,
        (True, True),
        lambda s, t, m: ref_geo.gram_loss(s, t, mask=m),
    ),
    "gram-raw": (
        geo_impl.gram_forward,
        geo_impl.gram_backward,
        (True, False),
        lambda s, t, m: ref_geo.gram_loss(s, t, normalize=False, mask=m),
    ),
    "cka": (geo_impl.cka_forward, geo_impl.cka_backward, (False,), lambda s, t, m: ref_geo.cka_loss(s, t, mask=m)),
    "cka-unbiased": (
        geo_impl.cka_forward,
        geo_impl.cka_backward,
        (True,),
        lambda s, t, m: ref_geo.cka_loss(s, t, unbiased=True, mask=m),
    ),
    "relation": (
        geo_impl.relation_forward,
        geo_impl.relation_backward,
        (),
        lambda s, t, m: ref_geo.relation_loss(s, t, mask=m),
    ),
}


@pytest.mark.parametrize("need", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("form", [geo_impl.NN, geo_impl.DD])
@pytest.mark.parametrize("kind", list(_GEO_KINDS))
def test_geometry_forms_fp32_match_float64_reference(kind, form, need):
    # Both forms in float32, batched, masked, Ds != Dt, duplicated rows: covers the one-pass N x N
    # combinations (gram's saved K - L), the one-side rebuild, and the skipped mask / centring /
    # CKA-projection steps of the preprocessing backward (exact no-ops: docs/geometry.md §2).
    fwd, bwd, flags, ref = _GEO_KINDS[kind]
    s, t = _geo_pair((2, 14, 6), (2, 14, 9), seed=4)
    with torch.no_grad():
        s[:, 5], t[:, 5] = s[:, 2], t[:, 2]
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, 3] = mask[1, 0] = mask[1, 9] = False
    go = torch.tensor(0.6, dtype=F64)
    loss, saved = fwd(s.float(), t.float(), mask, *flags, form=form)
    gs, gt = bwd(go.float(), s.float(), t.float(), mask, saved, *flags, *need, form=form)
    s64, t64 = s.clone().requires_grad_(), t.clone().requires_grad_()
    want = ref(s64, t64, mask)
    want.backward(go)
    rtol = _kt.tolerance(torch.float32)[0]
    _close(loss, want.detach(), f"{kind}/{form}: value", rtol=rtol)
    for got, exp, needed, name in ((gs, s64.grad, need[0], "student"), (gt, t64.grad, need[1], "teacher")):
        if needed:
            assert got.shape == exp.shape
            _close(got, exp, f"{kind}/{form}: grad {name}", rtol=rtol)
            dropped = ~mask
            assert (got[dropped] == 0).all(), f"{kind}/{form}: dropped rows must get exactly 0"
        else:
            assert got.numel() == 0
