"""Tests of the feature-geometry losses: gram, procrustes, cka, relation (kd_kernels/losses/geometry.py)."""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels.ops import geometry as O
from kd_kernels.reference import geometry as R
from kd_kernels.testing import (
    assert_close,
    assert_close_2x,
    assert_matches_reference,
    low_precision_floor,
    require,
    tolerance,
    value_and_grads,
)
from kd_kernels.torch_impl import geometry as T

# (public function, reference, kwargs): every flag combination of every loss.
CASES = [
    *[
        (kd_kernels.gram_loss, R.gram_loss, {"center": c, "normalize": nz})
        for c in (True, False)
        for nz in (True, False)
    ],
    *[(kd_kernels.procrustes_loss, R.procrustes_loss, {"center": c}) for c in (True, False)],
    *[(kd_kernels.cka_loss, R.cka_loss, {"unbiased": u}) for u in (False, True)],
    (kd_kernels.relation_loss, R.relation_loss, {}),
]
CASE_IDS = [f"{fn.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for fn, _, kw in CASES]
FUNCS = [kd_kernels.gram_loss, kd_kernels.procrustes_loss, kd_kernels.cka_loss, kd_kernels.relation_loss]

# (student shape, teacher shape). "dd": N > max(Ds, Dt), the D x D form; "nn": the N x N form
# (N - 1 < min(Ds, Dt), so X̄ᵀȲ is rank deficient: Procrustes drops zero singular values).
SHAPES = {
    "dd": ((13, 5), (13, 7)),
    "nn": ((5, 9), (5, 7)),
    "odd": ((41, 17), (41, 23)),
    "batched-dd": ((3, 11, 4), (3, 11, 6)),
    "batched-nn": ((2, 5, 8), (2, 5, 6)),
}
G = torch.tensor(0.37)  # grad_output != 1


def _pair(shape_key, dtype=torch.float64, teacher_grad=True, device="cpu"):
    (ss, ts) = SHAPES[shape_key]
    s = torch.randn(ss, dtype=dtype, device=device)
    return s, torch.randn(ts, dtype=dtype, device=device).requires_grad_(teacher_grad)


def _on(fn, backend):
    """The public function ``fn`` with ``backend=backend``."""
    return lambda a, b, **kw: fn(a, b, backend=backend, **kw)


def _matches_reference_fp32(fn, ref, s, t, backend="torch", **kw):
    """fp32 vs the fp64 reference: the table's rtol, with an absolute floor of rtol/10 scaled to
    each tensor's largest entry (entries that are sums of cancelling terms carry the rounding of
    the big ones)."""
    rtol, _ = tolerance(torch.float32, backend)
    got = value_and_grads(_on(fn, backend), s, t, grad_output=G, **kw)
    want = value_and_grads(ref, s, t, grad_output=G, dtype=torch.float64, **kw)
    assert got[0].dtype == torch.float32
    for g, w, what in zip(got, want, ("value", "grad student", "grad teacher")):
        atol = None if w is None else rtol / 10 * max(1.0, w.abs().max().item())
        assert_close(g, w, rtol=rtol, atol=atol, name=what)


def _rand_mask(shape, min_keep=4):
    m = torch.rand(shape) > 0.4
    m[..., :min_keep] = True  # enough kept rows for every loss (unbiased CKA needs 4)
    return m[..., torch.randperm(shape[-1])]


# ----------------------------------------------------------------------------- vs the reference


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_fp64(backend, case, shape):
    fn, ref, kw = case
    s, t = _pair(shape, device=require(backend, fn.__name__))
    assert_matches_reference(fn, ref, s, t, grad_output=G.double(), backend=backend, **kw)


@pytest.mark.parametrize("shape", ["dd", "nn", "batched-dd"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_fp32(backend, case, shape):
    fn, ref, kw = case
    s, t = _pair(shape, torch.float32, device=require(backend, fn.__name__))
    _matches_reference_fp32(fn, ref, s, t, backend, **kw)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_teacher_without_grad(backend, case):
    fn, ref, kw = case
    s, t = _pair("dd", teacher_grad=False, device=require(backend, fn.__name__))
    v, gs, gt = value_and_grads(_on(fn, backend), s, t, **kw)
    assert gt is None and t.grad is None
    rv, rgs, _ = value_and_grads(ref, s, t, **kw)
    assert_close(v, rv)
    assert_close(gs, rgs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_duplicated_rows(backend, case):
    fn, ref, kw = case
    s, t = _pair("dd", device=require(backend, fn.__name__))
    with torch.no_grad():
        s[3], t[3] = s[0], t[0]
        s[7], s[8], t[7], t[8] = s[1], s[1], t[1], t[1]
    assert_matches_reference(fn, ref, s, t, backend=backend, **kw)
    _matches_reference_fp32(fn, ref, s.float(), t.detach().float().requires_grad_(), backend, **kw)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_contiguous(backend, case):
    fn, ref, kw = case
    device = require(backend, fn.__name__)
    s = torch.randn(6, 12, dtype=torch.float64, device=device).T  # [12, 6], transposed view
    t = torch.randn(12, 10, dtype=torch.float64, device=device)[:, ::2].requires_grad_()  # [12, 5], strided
    assert not s.is_contiguous() and not t.is_contiguous()
    assert_matches_reference(fn, ref, s, t, grad_output=G.double(), backend=backend, **kw)
    _matches_reference_fp32(fn, ref, s.float(), t.detach().float().requires_grad_(), backend, **kw)


# ----------------------------------------------------------------------------- forms, masks, batches


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", ["dd", "nn", "batched-dd"])
@pytest.mark.parametrize(
    "kind",
    [("gram", {"center": c, "normalize": nz}) for c in (True, False) for nz in (True, False)]
    + [("cka", {"unbiased": u}) for u in (False, True)]
    + [("relation", {})],
    ids=lambda k: f"{k[0]}-{k[1]}",
)
def test_dd_and_nn_forms_agree(kind, shape, masked):
    name, kw = kind
    fwd, bwd = getattr(T, f"{name}_forward"), getattr(T, f"{name}_backward")
    s, t = _pair(shape)
    mask = _rand_mask(s.shape[:-1]) if masked else None
    out = {}
    for form in (T.DD, T.NN):
        loss, saved = fwd(s, t, mask, *kw.values(), form=form)
        out[form] = (loss, *bwd(G.double(), s, t, mask, saved, *kw.values(), True, True, form=form))
    for a, b, what in zip(out[T.DD], out[T.NN], ("value", "grad student", "grad teacher")):
        assert_close(a, b, name=what)
    # the automatic choice is the static shape rule
    n, ds, dt = s.shape[-2], s.shape[-1], t.shape[-1]
    assert T.choose_form(n, ds, dt) == (T.DD if n > max(ds, dt) else T.NN)


@pytest.mark.parametrize("int_mask", [False, True])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mask_equals_kept_rows_2d(case, int_mask):
    fn, _, kw = case
    s, t = _pair("odd")
    mask = _rand_mask((s.shape[0],))
    arg = mask.to(torch.int64) if int_mask else mask
    v, gs, gt = value_and_grads(lambda a, b: fn(a, b, mask=arg, **kw), s, t, grad_output=G.double())
    kv, kgs, kgt = value_and_grads(lambda a, b: fn(a[mask], b[mask], **kw), s, t, grad_output=G.double())
    assert_close(v, kv, name="value")
    assert_close(gs, kgs, name="grad student")
    assert_close(gt, kgt, name="grad teacher")
    assert gs[~mask].abs().max() == 0


@pytest.mark.parametrize("shape", ["batched-dd", "batched-nn"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mask_equals_kept_rows_batched(case, shape):
    fn, _, kw = case
    s, t = _pair(shape)
    mask = _rand_mask(s.shape[:-1])

    def per_item(a, b):
        return torch.stack([fn(a[i][mask[i]], b[i][mask[i]], **kw) for i in range(a.shape[0])]).mean()

    v, gs, gt = value_and_grads(lambda a, b: fn(a, b, mask=mask, **kw), s, t, grad_output=G.double())
    kv, kgs, kgt = value_and_grads(per_item, s, t, grad_output=G.double())
    assert_close(v, kv, name="value")
    assert_close(gs, kgs, name="grad student")
    assert_close(gt, kgt, name="grad teacher")


@pytest.mark.parametrize("shape", ["batched-dd", "batched-nn"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_batched_is_mean_of_items(case, shape):
    fn, _, kw = case
    s, t = _pair(shape)

    def per_item(a, b):
        return torch.stack([fn(a[i], b[i], **kw) for i in range(a.shape[0])]).mean()

    for got, want, what in zip(
        value_and_grads(lambda a, b: fn(a, b, **kw), s, t),
        value_and_grads(per_item, s, t),
        ("value", "grad student", "grad teacher"),
    ):
        assert_close(got, want, name=what)


# ----------------------------------------------------------------------------- autograd, ops, compile


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck(case, masked):
    fn, _, kw = case
    s = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 7, 2, dtype=torch.float64, requires_grad=True)
    mask = _rand_mask((2, 7), min_keep=5) if masked else None
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mask=mask, **kw), (s, t))
    s2, t2 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True), torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: fn(a, t2, mask=None, **kw), (s2,))  # N x N form


def _op_samples():
    """(student, teacher, mask): a 2-D D x D case without mask, a batched N x N case with one."""
    return [
        (torch.randn(9, 3), torch.randn(9, 4, requires_grad=True), None),
        (
            torch.randn(2, 4, 6, requires_grad=True),
            torch.randn(2, 4, 5),
            torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]]).bool(),
        ),
    ]


OP_FLAGS = {
    "gram": [(True, True), (False, False)],
    "cka": [(False,), (True,)],
    "relation": [()],
    "procrustes": [(True,), (False,)],
}


@pytest.mark.parametrize("name", list(OP_FLAGS))
def test_opcheck(name):
    fwd, bwd = getattr(O, f"{name}_fwd"), getattr(O, f"{name}_bwd")
    needs = [(True, True), (True, False), (False, True)]
    for i, flags in enumerate(OP_FLAGS[name]):
        for j, (s, t, mask) in enumerate(_op_samples()):
            torch.library.opcheck(fwd, (s, t, mask, *flags, "torch"))
            out = fwd(s.detach(), t.detach(), mask, *flags, "torch")
            need = needs[(i + j) % 3]  # rotate the need_student / need_teacher combinations
            torch.library.opcheck(bwd, (G, s.detach(), t.detach(), mask, *out[1:], *flags, *need, "torch"))


def test_unknown_op_backend_is_not_implemented():
    s, t = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(NotImplementedError, match="no_such_backend"):  # every geometry op has triton and cuda now
        O.procrustes_fwd(s, t, None, True, "no_such_backend")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compile_aot_eager(case):
    fn, _, kw = case
    torch._dynamo.reset()  # one lambda code object for every case: start from a clean cache
    s, t = _pair("batched-dd")
    mask = _rand_mask(s.shape[:-1])
    compiled = torch.compile(lambda a, b, m: fn(a, b, mask=m, **kw), fullgraph=True, backend="aot_eager")
    want = value_and_grads(lambda a, b: fn(a, b, mask=mask, **kw), s, t, grad_output=G.double())
    got = value_and_grads(lambda a, b: compiled(a, b, mask), s, t, grad_output=G.double())
    for g, w, what in zip(got, want, ("value", "grad student", "grad teacher")):
        assert_close(g, w, name=what)


@pytest.mark.parametrize("fn", FUNCS, ids=lambda f: f.__name__)
def test_compile_inductor(fn):
    torch._dynamo.reset()
    s, t = _pair("nn", torch.float32)
    compiled = torch.compile(fn, fullgraph=True)
    want = value_and_grads(fn, s, t, grad_output=G)
    got = value_and_grads(compiled, s, t, grad_output=G)
    for g, w, what in zip(got, want, ("value", "grad student", "grad teacher")):
        assert_close(g, w, name=what)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_functional_equals_module(case):
    fn, _, kw = case
    module_cls = {
        "gram_loss": kd_kernels.GramLoss,
        "procrustes_loss": kd_kernels.ProcrustesLoss,
        "cka_loss": kd_kernels.CKALoss,
        "relation_loss": kd_kernels.RelationLoss,
    }[fn.__name__]
    module = module_cls(**kw)
    assert all(f"{k}={v}" in repr(module) for k, v in kw.items())
    s, t = _pair("batched-nn")
    mask = _rand_mask(s.shape[:-1])
    for got, want in zip(value_and_grads(module, s, t), value_and_grads(lambda a, b: fn(a, b, **kw), s, t)):
        assert torch.equal(got, want)
    for got, want in zip(
        value_and_grads(lambda a, b: module(a, b, mask), s, t),
        value_and_grads(lambda a, b: fn(a, b, mask=mask, **kw), s, t),
    ):
        assert torch.equal(got, want)
    assert module_cls.__name__ in kd_kernels.nn.__all__ and fn.__name__ in kd_kernels.functional.__all__


# ----------------------------------------------------------------------------- edge cases


def _min_rows(fn, kw):
    if fn is kd_kernels.cka_loss:
        return 4 if kw["unbiased"] else 2
    return 2 if kw.get("center", False) else 1


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tiny_n(backend, case):
    fn, ref, kw = case
    device = require(backend, fn.__name__)
    lo = _min_rows(fn, kw)
    for n in range(1, 6):
        s = torch.randn(n, 3, dtype=torch.float64, device=device)
        t = torch.randn(n, 4, dtype=torch.float64, device=device, requires_grad=True)
        if n < lo:
            with pytest.raises(ValueError, match=f"N >= {lo}"):
                fn(s, t, backend=backend, **kw)
        else:
            assert_matches_reference(fn, ref, s, t, backend=backend, **kw)


def test_unbiased_cka_can_exceed_one():
    # Independent features at small N: the unbiased HSIC cross term is negative for some draws,
    # so CKA < 0 and the loss > 1 (legitimate, not the degenerate guard).
    found = 0
    for _ in range(40):
        s = torch.randn(6, 3, dtype=torch.float64)
        t = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
        if kd_kernels.cka_loss(s, t, unbiased=True) > 1:
            found += 1
            assert_matches_reference(kd_kernels.cka_loss, R.cka_loss, s, t, unbiased=True)
    assert found > 0


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_degenerate_constant_features(unbiased):
    # Constant student rows (0.5 is exact in binary, so the centred features are exactly 0):
    # HSIC(K, K) = 0, CKA is undefined and the documented result is loss 1 with zero gradient.
    s = torch.full((7, 3), 0.5, dtype=torch.float64)
    t = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    v, gs, gt = value_and_grads(kd_kernels.cka_loss, s, t, unbiased=unbiased)
    assert v == 1 and gs.abs().max() == 0 and gt.abs().max() == 0
    if not unbiased:  # Kornblith's biased centring gives an exactly zero K̃ too
        assert_matches_reference(kd_kernels.cka_loss, R.cka_loss, s, t, unbiased=False)


def test_relation_zero_rows():
    # All-zero rows normalise to zero (F.normalize's eps): they drop out of R_s exactly.
    s, t = _pair("dd")
    with torch.no_grad():
        s[2] = 0
    assert_matches_reference(kd_kernels.relation_loss, R.relation_loss, s, t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_low_precision(backend, case, dtype):
    fn, ref, kw = case
    device = require(backend, fn.__name__)
    s = torch.randn(24, 6, device=device).to(dtype)
    t = torch.randn(24, 5, device=device).to(dtype).requires_grad_()
    v, gs, gt = value_and_grads(_on(fn, backend), s, t, **kw)
    assert v.dtype == dtype and gs.dtype == dtype and gt.dtype == dtype
    rv, rgs, rgt = value_and_grads(ref, s, t, dtype=torch.float64, **kw)
    if fn is kd_kernels.procrustes_loss:  # no half-precision SVD to serve as the 2x yardstick
        rtol, atol = tolerance(dtype, backend)
        for got, want in ((v, rv), (gs, rgs), (gt, rgt)):
            assert_close(got, want, rtol=rtol, atol=atol)
        return
    base = value_and_grads(ref, s, t, **kw)  # plain PyTorch in the same dtype
    for got, want, b, what in zip((v, gs, gt), (rv, rgs, rgt), base, ("value", "grad student", "grad teacher")):
        floor = max(1e-3, 2 * low_precision_floor(dtype) * want.abs().max().item())
        assert_close_2x(got, want, b, name=what, floor=floor)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", FUNCS, ids=lambda f: f.__name__)
def test_bad_input(fn):
    s, t = torch.randn(6, 3), torch.randn(6, 4)
    with pytest.raises(ValueError, match="student must have shape"):
        fn(torch.randn(6), t)
    with pytest.raises(ValueError, match="student must have shape"):
        fn(torch.randn(2, 2, 6, 3), torch.randn(2, 2, 6, 4))
    with pytest.raises(ValueError, match="teacher must have shape"):
        fn(s, torch.randn(1, 6, 4))
    with pytest.raises(ValueError, match="must agree in every dim"):
        fn(s, torch.randn(5, 4))
    with pytest.raises(ValueError, match="must agree in every dim"):
        fn(torch.randn(2, 6, 3), torch.randn(3, 6, 4))
    with pytest.raises(ValueError, match="teacher is on meta"):
        fn(s, t.to("meta"))
    with pytest.raises(TypeError, match="student must be float16"):
        fn(torch.ones(6, 3, dtype=torch.int64), t)
    with pytest.raises(TypeError, match="teacher must be a torch.Tensor"):
        fn(s, t.tolist())
    with pytest.raises(ValueError, match="backend must be one of"):
        fn(s, t, backend="tpu")
    with pytest.raises(ValueError, match="backend='cuda'"):
        fn(s, t, backend="cuda")
    with pytest.raises(ValueError, match="mask must have shape \\[6\\]"):
        fn(s, t, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask is on meta"):
        fn(s, t, mask=torch.ones(6, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        fn(s, t, mask=[True] * 6)
    with pytest.raises(ValueError, match="N >= "):
        fn(torch.randn(0, 3), torch.randn(0, 4))


def test_bad_flags():
    s, t = torch.randn(6, 3), torch.randn(6, 4)
    with pytest.raises(TypeError, match="center must be a bool"):
        kd_kernels.gram_loss(s, t, center="yes")
    with pytest.raises(TypeError, match="normalize must be a bool"):
        kd_kernels.gram_loss(s, t, normalize=1)
    with pytest.raises(TypeError, match="center must be a bool"):
        kd_kernels.procrustes_loss(s, t, center=None)
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        kd_kernels.cka_loss(s, t, unbiased=0)
    with pytest.raises(ValueError, match="N >= 4"):
        kd_kernels.cka_loss(s[:3], t[:3], unbiased=True)
    with pytest.raises(ValueError, match="N >= 2"):
        kd_kernels.gram_loss(s[:1], t[:1])
    with pytest.raises(TypeError):
        kd_kernels.gram_loss(s, t, True)  # flags are keyword-only


def test_procrustes_ill_conditioned_fp32_gradient():
    # Regression: the polar factor used to drop singular values below σ_max·max(Ds, Dt)·eps
    # (~8e-6 σ_max here). Singular values of X̄ᵀȲ spread over 1 … 1e-5 are still resolved by a
    # float32 SVD, and each dropped one removed an O(1) term −2Ȳv_k u_kᵀ from the gradient (~16%
    # relative error, vs ~6e-4 for the float32 reference).
    n, d = 400, 64
    y = torch.randn(n, d, dtype=torch.float64)
    u = torch.linalg.svd(y - y.mean(0), full_matrices=False)[0]
    rot = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    x = u @ torch.diag(torch.logspace(0, -5, d, dtype=torch.float64)) @ rot  # decaying spectrum
    t = y.requires_grad_()
    got = value_and_grads(kd_kernels.procrustes_loss, x.float(), t.float().detach().requires_grad_())
    want = value_and_grads(R.procrustes_loss, x, t)
    for g, w in zip(got[1:], want[1:]):
        assert (g.double() - w).norm() < 1e-2 * w.norm()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_nonbinary_mask_keeps_nonzero_rows(case):
    # Regression: a mask was used as row WEIGHTS (a 2 doubled the row and counted twice), while
    # the reference, the logit losses and the docs treat it as keep/drop (nonzero = keep).
    fn, ref, kw = case
    s, t = _pair("dd")
    mask = torch.tensor([1, 0, 2, 1, 1, 0, 3, 1, 1, 0, 1, 5, 1])
    assert_matches_reference(fn, ref, s, t, mask=mask, **kw)
    assert_close(fn(s, t, mask=mask.float() / 2, **kw), fn(s, t, mask=mask != 0, **kw))
