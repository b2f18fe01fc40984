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
