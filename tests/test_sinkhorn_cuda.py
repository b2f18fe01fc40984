"""Contract of the CUDA C++ optimal-transport functions of kd_kernels._C (csrc/cuda/sinkhorn.cu):
``sinkhorn_{fwd,bwd}_cuda`` (batched log-domain Sinkhorn: tol / check_every / implicit, stride-0
costs and marginals, zero marginals, the fused and the rows-do-not-fit paths) and
``sinkhorn_loss_{fwd,bwd}_cuda`` (SinKD: the one-block and the many-launch paths), each against the
float64 torch path (kd_kernels.torch_impl.sinkhorn) on fresh random inputs. fp32 within a
scale-aware fp32 tolerance; fp16 / bf16 by the 2x rule (kd_kernels.testing.assert_close_2x) against
the torch path run on the same low-precision inputs.

All tests need a GPU and the compiled extension; they skip with "needs a CUDA device and
kd_kernels._C" otherwise.
"""

from __future__ import annotations

import pytest
import torch

from kd_kernels.testing import assert_close, assert_close_2x, low_precision_floor
from kd_kernels.torch_impl import sinkhorn as ref

NAMES = ("sinkhorn_fwd_cuda", "sinkhorn_bwd_cuda", "sinkhorn_loss_fwd_cuda", "sinkhorn_loss_bwd_cuda")
SKIP = "needs a CUDA device and kd_kernels._C"
LOW = (torch.float16, torch.bfloat16)


@pytest.fixture
def C():
    if not torch.cuda.is_available():
        pytest.skip(SKIP + " (no CUDA device)")
    from kd_kernels._backend import extension_status, load_extension

    ext = load_extension()
    if ext is None or not all(hasattr(ext, n) for n in NAMES):
        pytest.skip(f"{SKIP} (kd_kernels._C: {extension_status()})")
    return ext


def _close32(actual, expected, name, rel=3e-5):
    """fp32 against float64: relative error `rel` of the tensor's scale (potentials are O(C/eps))."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    assert_close(actual.double(), expected, rtol=rel, atol=rel * scale + 1e-7, name=name)


def _check(actual, expected64, baseline, dtype, name):
    """fp32: _close32; fp16 / bf16: the 2x rule against plain PyTorch on the same inputs."""
    if dtype in LOW:
        floor = low_precision_floor(dtype) * expected64.abs().max().item() + 1e-6
        assert_close_2x(actual, expected64, baseline, name=name, floor=floor)
    else:
        _close32(actual, expected64, name)


def _problems(nb, n, m, dtype, *, spread=True, seed=0):
    """Costs [B, n, m] with per-problem scales (different convergence speeds), positive marginals."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(nb, n, 3, device="cuda", generator=g)
    y = torch.randn(nb, m, 3, device="cuda", generator=g)
    cost = torch.cdist(x, y).pow(2) / 3
    if spread:
        cost = cost * torch.linspace(0.3, 2.0, nb, device="cuda")[:, None, None]
    a = torch.rand(nb, n, device="cuda", generator=g) + 0.2
    b = torch.rand(nb, m, device="cuda", generator=g) + 0.2
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return cost.to(dtype), a, b


def _ref_fwd(cost, a, b, eps, iters, tol, every, implicit):
    return ref.sinkhorn_fwd(cost.double(), a.double(), b.double(), eps, iters, tol, every, implicit)


# ---- forward ------------------------------------------------------------------------------------
FWD_SHAPES = [(1, 1, 1), (3, 5, 7), (2, 33, 130), (2, 70, 4100)]  # last: rows do not fit (m > 4096)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", FWD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("implicit", [False, True], ids=["unrolled", "implicit"])
def test_forward_matches_float64_no_tol(C, shape, implicit):
    nb, n, m = shape
    cost, a, b = _problems(nb, n, m, torch.float32)
    plan, al, be, n_run = C.sinkhorn_fwd_cuda(cost, a, b, 0.2, 9, 0.0, 1, implicit)
    p64, al64, be64, _ = _ref_fwd(cost, a, b, 0.2, 9, 0.0, 1, implicit)
    assert plan.dtype == torch.float32 and plan.is_contiguous() and plan.shape == cost.shape
    assert al.shape == ((1 if implicit else 9), nb, n) and al.dtype == be.dtype == torch.float32
    assert n_run.dtype == torch.int32 and torch.equal(n_run.cpu(), torch.full((nb,), 9, dtype=torch.int32))
    _close32(plan, p64, "plan")
    _close32(al, al64, "alphas")
    _close32(be, be64, "betas")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [40, 4100], ids=["fused", "rows-do-not-fit"])
@pytest.mark.parametrize("implicit", [False, True], ids=["unrolled", "implicit"])
def test_forward_tol_freezes_on_device(C, m, implicit):
    nb, n, iters, every, tol = 6, 24, 60, 3, 1e-4
    cost, a, b = _problems(nb, n, m, torch.float32, seed=1)
    plan, al, be, n_run = C.sinkhorn_fwd_cuda(cost, a, b, 0.1, iters, tol, every, implicit)
    p64, al64, be64, nr64 = _ref_fwd(cost, a, b, 0.1, iters, tol, every, implicit)
    nr, nr64 = n_run.cpu().long(), nr64.cpu().long()
    assert (nr % every == 0).logical_or(nr == iters).all(), nr
    assert (nr < iters).any() and (nr == iters).any(), f"the batch should mix converged and unconverged: {nr}"
    # fp32 vs fp64 may cross the tolerance one check apart; never more
    assert ((nr - nr64).abs() <= every).all(), (nr, nr64)
    same = (nr == nr64).cuda()
    assert same.sum() >= nb - 1, (nr, nr64)
    _close32(plan[same], p64[same], "plan")
    _close32(al[:, same], al64[:, same], "alphas")
    _close32(be[:, same], be64[:, same], "betas")
    if not implicit:  # rows past n_run repeat the last potentials
        for bb in range(nb):
            k = int(nr[bb])
            assert torch.equal(al[k - 1 :, bb], al[k - 1, bb].expand_as(al[k - 1 :, bb]))
            assert torch.equal(be[k - 1 :, bb], be[k - 1, bb].expand_as(be[k - 1 :, bb]))


@pytest.mark.gpu
def test_forward_stride0_cost_and_marginals_and_strided_cost(C):
    nb, n, m = 4, 9, 13
    base, a, b = _problems(1, n, m, torch.float32, spread=False, seed=2)
    cost = base.expand(nb, n, m)
    aa, bb = a.expand(nb, n), b.expand(nb, m)
    plan, al, be, _ = C.sinkhorn_fwd_cuda(cost, aa, bb, 0.15, 7, 0.0, 1, False)
    p64, al64, be64, _ = _ref_fwd(cost, aa, bb, 0.15, 7, 0.0, 1, False)
    _close32(plan, p64, "plan (shared cost)")
    _close32(al, al64, "alphas (shared cost)")
    # a transposed (non-contiguous) cost is read through its strides
    ct, a2, b2 = _problems(nb, m, n, torch.float32, seed=3)
    ct = ct.transpose(1, 2)
    a2, b2 = b2, a2
    plan, al, be, _ = C.sinkhorn_fwd_cuda(ct, a2, b2, 0.15, 7, 0.0, 1, False)
    p64, al64, be64, _ = _ref_fwd(ct, a2, b2, 0.15, 7, 0.0, 1, False)
    _close32(plan, p64, "plan (strided cost)")
    _close32(be, be64, "betas (strided cost)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_forward_low_precision_2x_rule(C, dtype):
    cost, a, b = _problems(3, 17, 45, dtype, seed=4)
    plan, al, be, _ = C.sinkhorn_fwd_cuda(cost, a, b, 0.2, 8, 0.0, 1, False)
    p64, al64, be64, _ = _ref_fwd(cost, a, b, 0.2, 8, 0.0, 1, False)
    pb, alb, beb, _ = ref.sinkhorn_fwd(cost, a, b, 0.2, 8)
    assert plan.dtype == dtype and al.dtype == torch.float32
    _check(plan, p64, pb, dtype, "plan")
    _check(al, al64, alb, dtype, "alphas")
    _check(be, be64, beb, dtype, "betas")


@pytest.mark.gpu
def test_zero_marginal_and_nonfinite_cost(C):
    cost, a, b = _problems(2, 6, 8, torch.float32, seed=5)
    a = a.clone()
    a[0, 2] = 0.0
    plan, al, _, _ = C.sinkhorn_fwd_cuda(cost, a, b, 0.2, 6, 0.0, 1, False)
    assert torch.isneginf(al[:, 0, 2]).all() and (plan[0, 2] == 0).all() and torch.isfinite(plan).all()
    p64, *_ = _ref_fwd(cost, a, b, 0.2, 6, 0.0, 1, False)
    _close32(plan, p64, "plan (zero marginal)")
    bad = cost.clone()
    bad[1, 3, 4] = float("nan")
    plan, *_ = C.sinkhorn_fwd_cuda(bad, a, b, 0.2, 6, 1e-3, 1, False)
    assert not torch.isfinite(plan[1]).all() and torch.isfinite(plan[0]).all()


# ---- backward -----------------------------------------------------------------------------------
def _bwd_case(C, nb, n, m, dtype, tol, every, implicit, a_zero=False, seed=6, iters=12, eps=0.15):
    cost, a, b = _problems(nb, n, m, dtype, seed=seed)
    if a_zero:
        a = a.clone()
        a[0, 1] = 0.0
    g = torch.randn(nb, n, m, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed + 1))
    g = g.to(dtype)
    out = C.sinkhorn_fwd_cuda(cost, a, b, eps, iters, tol, every, implicit)
    out64 = _ref_fwd(cost, a, b, eps, iters, tol, every, implicit)
    # the backward against the float64 recurrence at the same saved potentials' float64 twins
    grads = C.sinkhorn_bwd_cuda(g, cost, a, b, out[1], out[2], out[3], eps, iters, implicit, True, True, True)
    grads64 = ref.sinkhorn_bwd(
        g.double(),
        cost.double(),
        a.double(),
        b.double(),
        out64[1],
        out64[2],
        out64[3],
        eps,
        iters,
        implicit,
        True,
        True,
        True,
    )
    return out, out64, grads, grads64, (cost, a, b, g)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (3, 7, 5), (2, 40, 97), (1, 20, 4100)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("implicit", [False, True], ids=["unrolled", "implicit"])
def test_backward_matches_float64(C, shape, implicit):
    _, _, grads, grads64, (cost, a, b, _) = _bwd_case(C, *shape, torch.float32, 0.0, 1, implicit)
    for x, got, want, name in zip((cost, a, b), grads, grads64, ("grad_cost", "grad_a", "grad_b"), strict=True):
        assert got.shape == x.shape and got.dtype == x.dtype
        _close32(got, want, name, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("implicit", [False, True], ids=["unrolled", "implicit"])
def test_backward_with_frozen_problems(C, implicit):
    out, out64, grads, grads64, _ = _bwd_case(C, 5, 16, 21, torch.float32, 1e-4, 2, implicit, iters=50, eps=0.1)
    nr, nr64 = out[3].cpu(), out64[3].cpu()
    same = (nr == nr64).cuda()
    assert (nr < 50).any(), nr
    assert same.sum() >= 4, (nr, nr64)
    for got, want, name in zip(grads, grads64, ("grad_cost", "grad_a", "grad_b"), strict=True):
        _close32(got[same], want[same], name, rel=1e-4)


@pytest.mark.gpu
def test_backward_zero_marginal_keeps_cost_grad_finite(C):
    _, _, grads, grads64, _ = _bwd_case(C, 2, 6, 9, torch.float32, 0.0, 1, False, a_zero=True)
    assert torch.isfinite(grads[0]).all()
    _close32(grads[0], grads64[0], "grad_cost (zero marginal)", rel=1e-4)
    assert torch.isnan(grads[1][0, 1]) == torch.isnan(grads64[1][0, 1])


@pytest.mark.gpu
def test_backward_empty_unneeded_grads_and_low_precision(C):
    cost, a, b = _problems(2, 5, 6, torch.bfloat16, seed=9)
    plan, al, be, nr = C.sinkhorn_fwd_cuda(cost, a, b, 0.2, 5, 0.0, 1, False)
    g = torch.randn_like(plan)
    gc, ga, gb = C.sinkhorn_bwd_cuda(g, cost, a, b, al, be, nr, 0.2, 5, False, True, False, False)
    assert gc.dtype == torch.bfloat16 and gc.shape == cost.shape and ga.numel() == 0 and gb.numel() == 0
    _, al64, be64, nr64 = _ref_fwd(cost, a, b, 0.2, 5, 0.0, 1, False)
    want = ref.sinkhorn_bwd(
        g.double(), cost.double(), a.double(), b.double(), al64, be64, nr64, 0.2, 5, False, True, False, False
    )[0]
    _, alb, beb, nrb = ref.sinkhorn_fwd(cost, a, b, 0.2, 5)
    base = ref.sinkhorn_bwd(g, cost, a, b, alb, beb, nrb, 0.2, 5, False, True, False, False)[0]
    _check(gc, want, base, torch.bfloat16, "grad_cost bf16")


@pytest.mark.gpu
def test_bad_arguments_raise_named_errors(C):
    cost, a, b = _problems(2, 3, 4, torch.float32)
    with pytest.raises(RuntimeError, match="CUDA"):
        C.sinkhorn_fwd_cuda(cost.cpu(), a.cpu(), b.cpu(), 0.1, 3, 0.0, 1, False)
    with pytest.raises(RuntimeError, match="b must have shape"):
        C.sinkhorn_fwd_cuda(cost, a, b[:, :3], 0.1, 3, 0.0, 1, False)
    with pytest.raises(RuntimeError, match="check_every"):
        C.sinkhorn_fwd_cuda(cost, a, b, 0.1, 3, 1e-3, 0, False)
    with pytest.raises(RuntimeError, match="float64"):
        C.sinkhorn_fwd_cuda(cost.double(), a, b, 0.1, 3, 0.0, 1, False)
    with pytest.raises(RuntimeError, match="epsilon"):
        C.sinkhorn_fwd_cuda(cost, a, b, 0.0, 3, 0.0, 1, False)


# ---- SinKD --------------------------------------------------------------------------------------
def _logits(nb, c, dtype, seed=10):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(nb, c, device="cuda", generator=g) * 2).to(dtype), (
        torch.randn(nb, c, device="cuda", generator=g) * 2
    ).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 3), (5, 37), (70, 1000), (200, 65)], ids=lambda s: "x".join(map(str, s)))
def test_sinkd_matches_float64(C, shape):
    """B <= 128: the one-block kernels; B = 200: the many-launch path."""
    nb, c = shape
    s, t = _logits(nb, c, torch.float32)
    loss, D, U, V = C.sinkhorn_loss_fwd_cuda(s, t, 2.0, 0.1, 7)
    l64, D64, U64, V64 = ref.sinkhorn_loss_fwd(s.double(), t.double(), 2.0, 0.1, 7)
    assert loss.shape == () and loss.dtype == torch.float32 and D.shape == (nb, nb) and U.shape == (8, nb)
    _close32(D, D64, "D")
    _close32(U, U64, "U", rel=1e-4)
    _close32(V, V64, "V", rel=1e-4)
    _close32(loss, l64, "loss", rel=1e-4)
    g = torch.tensor(0.7, device="cuda")
    gs, gt = C.sinkhorn_loss_bwd_cuda(g, s, t, D, U, V, 2.0, 0.1, True, True)
    gs64, gt64 = ref.sinkhorn_loss_bwd(g.double(), s.double(), t.double(), D64, U64, V64, 2.0, 0.1, True, True)
    _close32(gs, gs64, "grad_student", rel=2e-4)
    _close32(gt, gt64, "grad_teacher", rel=2e-4)
    gs, gt = C.sinkhorn_loss_bwd_cuda(g, s, t, D, U, V, 2.0, 0.1, False, True)
    assert gs.numel() == 0 and gt.shape == t.shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_sinkd_low_precision_2x_rule(C, dtype):
    s, t = _logits(9, 50, dtype, seed=11)
    loss, D, U, V = C.sinkhorn_loss_fwd_cuda(s, t, 2.0, 0.1, 5)
    l64, D64, U64, V64 = ref.sinkhorn_loss_fwd(s.double(), t.double(), 2.0, 0.1, 5)
    lb, Db, Ub, Vb = ref.sinkhorn_loss_fwd(s, t, 2.0, 0.1, 5)
    assert loss.dtype == dtype
    _check(loss, l64, lb, dtype, "loss")
    g = torch.tensor(1.3, device="cuda")
    gs, _ = C.sinkhorn_loss_bwd_cuda(g, s, t, D, U, V, 2.0, 0.1, True, False)
    gs64, _ = ref.sinkhorn_loss_bwd(g.double(), s.double(), t.double(), D64, U64, V64, 2.0, 0.1, True, False)
    gsb, _ = ref.sinkhorn_loss_bwd(g, s, t, Db, Ub, Vb, 2.0, 0.1, True, False)
    assert gs.dtype == dtype
    _check(gs, gs64, gsb, dtype, "grad_student")


@pytest.mark.gpu
def test_sinkd_nonfinite_logit_gives_nonfinite_loss(C):
    s, t = _logits(4, 6, torch.float32, seed=12)
    s[1, 2] = float("nan")
    loss, *_ = C.sinkhorn_loss_fwd_cuda(s, t, 2.0, 0.1, 3)
    assert not torch.isfinite(loss)
    s[1, 2] = float("inf")
    loss, *_ = C.sinkhorn_loss_fwd_cuda(s, t, 2.0, 0.1, 3)
    assert not torch.isfinite(loss)
