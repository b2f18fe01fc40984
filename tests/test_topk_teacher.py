"""Offline top-k teachers (kd_kernels.TopKTeacher) on the PyTorch path: against dense teachers
restricted to their top k ("renormalize") and against an explicit (k + 1)-bucket computation
("rest"), values and student gradients, float64 and float32."""

from __future__ import annotations

import math

import pytest
import torch

import kd_kernels
from kd_kernels import TopKTeacher
from kd_kernels.ops import _define
from kd_kernels.torch_impl import topk as topk_impl

LOSSES = {
    "kd": kd_kernels.kd_loss,
    "reverse_kl": kd_kernels.reverse_kl_loss,
    "jsd": kd_kernels.jsd_loss,
    "tvd": kd_kernels.tvd_loss,
}
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-4, "atol": 2e-5}}


def _kwargs(kind, temperature, beta=0.5):
    kw = {"temperature": temperature}
    if kind == "jsd":
        kw["beta"] = beta
    return kw


def _data(n, v, k, dtype, seed=0, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)
    zt = 3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    lp_full = torch.log_softmax(zt / temperature, dim=1)  # the teacher's final (tempered) log-probs
    lp, idx = torch.topk(lp_full, k, dim=1)
    return s, lp_full, lp.to(dtype), idx


def _dense_restricted(lp, idx, v, temperature):
    """Dense teacher logits whose softmax(z / T) is the top-k teacher renormalized (-inf elsewhere)."""
    z = torch.full((lp.shape[0], v), -math.inf, dtype=lp.dtype)
    return z.scatter(1, idx, lp * temperature)


def _loss_and_grad(fn, s, teacher, grad_output=None, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, teacher, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    (g,) = torch.autograd.grad(loss, s, go)
    return loss.detach(), g


# ------------------------------------------------------------------------------------------
# "renormalize" == the dense loss with the teacher set to -inf outside its top k
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["kd", "jsd", "tvd"])
@pytest.mark.parametrize("k", [1, 5, 37])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_renormalize_matches_dense_restricted_teacher(dtype, kind, k, temperature):
    n, v = 6, 37
    s, _, lp, idx = _data(n, v, k, dtype, seed=k, temperature=temperature)
    fn, kw = LOSSES[kind], _kwargs(kind, temperature)
    dense_t = _dense_restricted(lp, idx, v, temperature)
    ref, gref = _loss_and_grad(fn, s, dense_t, backend="torch", **kw)
    got, g = _loss_and_grad(fn, s, TopKTeacher(idx, lp), **kw)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    torch.testing.assert_close(g, gref, **TOL[dtype])
    assert g.dtype == s.dtype and g.shape == s.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_renormalize_reverse_kl(dtype):
    n, v, k = 5, 20, 6
    s, _, lp, idx = _data(n, v, k, dtype, seed=3)
    # the student has mass outside the k: reverse KL against a teacher with none there is +inf
    got = kd_kernels.reverse_kl_loss(s, TopKTeacher(idx, lp), reduction="none")
    ref = kd_kernels.reverse_kl_loss(s, _dense_restricted(lp, idx, v, 1.0), reduction="none", backend="torch")
    assert torch.isinf(got).all() and torch.isinf(ref).all()
    # a student with no mass outside the k: finite, and equal to the dense loss, gradients too
    s_in = torch.full_like(s, -math.inf).scatter(1, idx, s.gather(1, idx))
    for t in (1.0, 2.0):
        ref, gref = _loss_and_grad(kd_kernels.reverse_kl_loss, s_in, _dense_restricted(lp, idx, v, t), temperature=t,
                                   backend="torch")  # fmt: skip
        got, g = _loss_and_grad(kd_kernels.reverse_kl_loss, s_in, TopKTeacher(idx, lp), temperature=t)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, ref, **TOL[dtype])
        torch.testing.assert_close(g, gref, **TOL[dtype])
    # k = V: finite with any student
    s, _, lp, idx = _data(n, v, v, dtype, seed=4)
    ref, gref = _loss_and_grad(kd_kernels.reverse_kl_loss, s, _dense_restricted(lp, idx, v, 1.0), backend="torch")
    got, g = _loss_and_grad(kd_kernels.reverse_kl_loss, s, TopKTeacher(idx, lp))
    torch.testing.assert_close(got, ref, **TOL[dtype])
    torch.testing.assert_close(g, gref, **TOL[dtype])


# ------------------------------------------------------------------------------------------
# "rest": an explicit (k + 1)-bucket computation, differentiated by autograd
# ------------------------------------------------------------------------------------------


def _bucket_reference(kind, s, lp, idx, temperature, beta=0.5, missing="rest"):
    """Per-row losses [N] from explicit k + 1 buckets, float64, differentiable in ``s``."""
    q_full = torch.softmax(s.double() / temperature, dim=1)
    q_k = q_full.gather(1, idx)
    outside = torch.ones_like(q_full, dtype=torch.bool).scatter(1, idx, False)
    q = torch.cat([q_k, (q_full * outside).sum(1, keepdim=True)], dim=1)
    p_k = lp.double().exp()
    if missing == "rest":
        p_rest = (1 - p_k.sum(1, keepdim=True)).clamp_min(0) * (idx.shape[1] < s.shape[1])  # k = V: no rest
        p = torch.cat([p_k, p_rest], dim=1)
    else:
        p = torch.cat([p_k / p_k.sum(1, keepdim=True), torch.zeros_like(p_k[:, :1])], dim=1)
    if idx.shape[1] == s.shape[1]:  # k = V: the rest bucket is empty, leave it out
        p, q = p[:, :-1], q[:, :-1]

    def kl(a, b):  # sum a log(a / b), 0 log 0 = 0
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(1)

    if kind == "kd":
        return temperature**2 * kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    return 0.5 * (p - q).abs().sum(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("k", [1, 4, 30])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rest_matches_explicit_buckets(dtype, kind, k, temperature):
    n, v = 7, 30
    s, _, lp, idx = _data(n, v, k, dtype, seed=10 + k)
    if k < v:  # the given probabilities sum to < 1 even where the top k hold nearly all the mass
        lp = lp - 0.1
    fn, kw = LOSSES[kind], _kwargs(kind, temperature, beta=0.3)
    go = torch.rand(n, dtype=torch.float64).to(dtype) + 0.5  # grad_output != 1
    got, g = _loss_and_grad(fn, s, TopKTeacher(idx, lp, "rest"), grad_output=go, reduction="none", **kw)
    s64 = s.detach().double().requires_grad_(True)
    ref = _bucket_reference(kind, s64, lp, idx, temperature, beta=0.3)
    (gref,) = torch.autograd.grad(ref, s64, go.double())
    torch.testing.assert_close(got.double(), ref.detach(), **TOL[dtype])
    torch.testing.assert_close(g.double(), gref, **TOL[dtype])


@pytest.mark.parametrize("kind", list(LOSSES))
def test_renormalize_matches_explicit_buckets(kind):
    """The bucket reference with p_rest = 0 is the renormalize mode (an independent check of it)."""
    n, v, k = 5, 25, 7
    s, _, lp, idx = _data(n, v, k, torch.float64, seed=21)
    got, g = _loss_and_grad(LOSSES[kind], s, TopKTeacher(idx, lp), reduction="sum", **_kwargs(kind, 1.5, beta=0.6))
    s64 = s.detach().requires_grad_(True)
    ref = _bucket_reference(kind, s64, lp, idx, 1.5, beta=0.6, missing="renormalize").sum()
    torch.testing.assert_close(got, ref.detach(), **TOL[torch.float64])
    if torch.isfinite(ref):
        (gref,) = torch.autograd.grad(ref, s64)
        torch.testing.assert_close(g, gref, **TOL[torch.float64])


# ------------------------------------------------------------------------------------------
# ignore_mask, reductions, -inf log-probs, index order, jsd endpoints, chunking
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["renormalize", "rest"])
@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_ignore_mask_drops_rows(missing, kind, reduction):
    n, v, k = 8, 16, 5
    s, _, lp, idx = _data(n, v, k, torch.float64, seed=5)
    mask = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    if kind == "reverse_kl" and missing == "renormalize":
        s = torch.full_like(s, -math.inf).scatter(1, idx, s.gather(1, idx))
    s = s.clone()
    s[1] = float("nan")  # a dropped row may hold anything
    fn, kw = LOSSES[kind], _kwargs(kind, 2.0)
    got, g = _loss_and_grad(fn, s, TopKTeacher(idx, lp, missing), reduction=reduction, ignore_mask=mask, **kw)
    keep = ~mask
    ref, gref = _loss_and_grad(fn, s[keep], TopKTeacher(idx[keep], lp[keep], missing), reduction=reduction, **kw)
    if reduction == "none":
        torch.testing.assert_close(got[keep], ref)
        assert (got[mask] == 0).all()
    else:
        torch.testing.assert_close(got, ref)
    assert (g[mask] == 0).all()
    torch.testing.assert_close(g[keep], gref)


def test_all_rows_dropped_gives_zero():
    s, _, lp, idx = _data(4, 10, 3, torch.float32)
    s.requires_grad_(True)
    loss = kd_kernels.kd_loss(s, TopKTeacher(idx, lp), ignore_mask=torch.ones(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()


@pytest.mark.parametrize("missing", ["renormalize", "rest"])
@pytest.mark.parametrize("kind", list(LOSSES))
def test_minus_inf_logprobs_are_probability_zero(missing, kind):
    n, v, k = 4, 12, 6
    s, _, lp, idx = _data(n, v, k, torch.float64, seed=7)
    lp = lp.clone()
    lp[:, 3:] = -math.inf  # only the first 3 entries carry mass
    fn, kw = LOSSES[kind], _kwargs(kind, 1.0)
    if kind == "reverse_kl" and missing == "renormalize":
        s = torch.full_like(s, -math.inf).scatter(1, idx[:, :3], s.gather(1, idx[:, :3]))
    got, g = _loss_and_grad(fn, s, TopKTeacher(idx, lp, missing), reduction="none", **kw)
    s64 = s.detach().requires_grad_(True)
    ref = _bucket_reference(kind, s64, lp, idx, 1.0, missing=missing)
    torch.testing.assert_close(got, ref.detach())
    if kind == "reverse_kl" and missing == "rest":
        assert torch.isinf(got).all()  # the student has mass where the teacher has none
        return
    if kind == "reverse_kl":  # dropping the -inf entries (the student has none there) changes nothing
        ref2, gref = _loss_and_grad(fn, s, TopKTeacher(idx[:, :3], lp[:, :3], missing), reduction="none", **kw)
    else:
        (gref,) = torch.autograd.grad(ref.sum(), s64)
        ref2 = ref.detach()
    assert torch.isfinite(got).all() and torch.isfinite(g).all()
    torch.testing.assert_close(got, ref2)
    torch.testing.assert_close(g, gref)


@pytest.mark.parametrize("missing", ["renormalize", "rest"])
def test_index_order_does_not_matter(missing):
    n, v, k = 5, 40, 9
    s, _, lp, idx = _data(n, v, k, torch.float64, seed=8)
    perm = torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(i)) for i in range(n)])
    a, ga = _loss_and_grad(kd_kernels.jsd_loss, s, TopKTeacher(idx, lp, missing))
    b, gb = _loss_and_grad(kd_kernels.jsd_loss, s, TopKTeacher(idx.gather(1, perm), lp.gather(1, perm), missing))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints(beta):
    n, v, k = 4, 10, 10
    s, _, lp, idx = _data(n, v, k, torch.float64, seed=9)
    dense = _dense_restricted(lp, idx, v, 1.0)
    ref, gref = _loss_and_grad(kd_kernels.jsd_loss, s, dense, beta=beta, backend="torch")
    got, g = _loss_and_grad(kd_kernels.jsd_loss, s, TopKTeacher(idx, lp), beta=beta)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g, gref)


@pytest.mark.parametrize("missing", ["renormalize", "rest"])
def test_row_chunks_give_the_same_result(missing):
    n, v, k = 9, 13, 4
    s, _, lp, idx = _data(n, v, k, torch.float64, seed=11)
    rows, lse, lse_out = topk_impl.topk_fwd(s, idx, lp, "tvd", missing == "rest", 0.0, 1.3)
    rows2, lse2, lse_out2 = topk_impl.topk_fwd(s, idx, lp, "tvd", missing == "rest", 0.0, 1.3, chunk_rows=2)
    torch.testing.assert_close(rows, rows2)
    go = torch.rand(n, dtype=torch.float64)
    g = topk_impl.topk_bwd(go, s, idx, lp, lse, lse_out, "tvd", missing == "rest", 0.0, 1.3)
    g2 = topk_impl.topk_bwd(go, s, idx, lp, lse2, lse_out2, "tvd", missing == "rest", 0.0, 1.3, chunk_rows=3)
    torch.testing.assert_close(g, g2)


def test_low_precision_student_and_module_form():
    s, _, lp, idx = _data(6, 50, 8, torch.float32, seed=12)
    ref = kd_kernels.kd_loss(s, TopKTeacher(idx, lp), temperature=2.0)
    sb = s.bfloat16().requires_grad_(True)
    got = kd_kernels.KDLoss(temperature=2.0)(sb, TopKTeacher(idx, lp.bfloat16()))
    got.backward()
    assert got.dtype == torch.bfloat16 and sb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=3e-2, atol=3e-2)


def test_logprobs_get_no_gradient_and_the_teacher_is_not_modified():
    s, _, lp, idx = _data(3, 10, 4, torch.float64, seed=13)
    s.requires_grad_(True)
    lp = lp.clone().requires_grad_(True)
    before = s.detach().clone()
    kd_kernels.kd_loss(s, TopKTeacher(idx, lp, "rest"), temperature=1.0).backward()
    assert lp.grad is None and s.grad is not None
    assert torch.equal(s.detach(), before)


# ------------------------------------------------------------------------------------------
# validation, the op helper, torch.compile
# ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_naming_the_argument():
    s, _, lp, idx = _data(3, 10, 4, torch.float32)
    with pytest.raises(ValueError, match=r"kd_loss: teacher_logits.missing must be one of"):
        kd_kernels.kd_loss(s, TopKTeacher(idx, lp, "drop"))
    with pytest.raises(TypeError, match=r"jsd_loss: teacher_logits.indices must be an int64"):
        kd_kernels.jsd_loss(s, TopKTeacher(idx.int(), lp))
    with pytest.raises(ValueError, match=r"tvd_loss: teacher_logits.logprobs must have the shape of indices"):
        kd_kernels.tvd_loss(s, TopKTeacher(idx, lp[:, :2]))
    with pytest.raises(ValueError, match=r"reverse_kl_loss: teacher_logits.indices must have 1 <= k <= V"):
        kd_kernels.reverse_kl_loss(s, TopKTeacher(torch.zeros(3, 11, dtype=torch.int64), torch.zeros(3, 11)))
    with pytest.raises(ValueError, match=r"kd_loss: teacher_logits.indices must have shape \[N, k\]"):
        kd_kernels.kd_loss(s, TopKTeacher(idx[:2], lp[:2]))
    with pytest.raises(ValueError, match=r"kd_loss: temperature"):
        kd_kernels.kd_loss(s, TopKTeacher(idx, lp), temperature=-1.0)
    with pytest.raises(ValueError, match=r"kd_loss: ignore_mask must have shape"):
        kd_kernels.kd_loss(s, TopKTeacher(idx, lp), ignore_mask=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"kd_loss: backend='cuda' is not implemented"):
        kd_kernels.kd_loss(s, TopKTeacher(idx, lp), backend="cuda")


def test_op_is_defined_by_the_helper():
    assert "topk" in _define.LOSS_OPS
    schema = torch.ops.kd_kernels.topk_fwd.default._schema
    assert schema.arguments[-1].name == "backend"


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("missing", ["renormalize", "rest"])
def test_torch_compile_fullgraph(missing, compiler):
    s, _, lp, idx = _data(6, 24, 5, torch.float32, seed=14)
    mask = torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.bool)

    def f(s, idx, lp, mask):
        t = TopKTeacher(idx, lp, missing)
        return kd_kernels.kd_loss(s, t, temperature=2.0, ignore_mask=mask) + kd_kernels.jsd_loss(s, t, beta=0.4)

    ref, gref = _loss_and_grad(lambda x, _t: f(x, idx, lp, mask), s, None)
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    got, g = _loss_and_grad(lambda x, _t: compiled(x, idx, lp, mask), s, None)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g, gref)
