"""Non-finite and degenerate input (issue 9, items 1 and 5).

* NaN / ±inf in an input never yields a finite loss, for every public loss and every backend
  that runs here (the RKD clamp masks used to map NaN distances to "clamped" and return a
  finite loss; procrustes_loss leaked torch._LinAlgError).
* −inf logits are vocabulary masking: −inf in student and teacher at the same classes
  contributes 0 (the loss equals the float64 loss on the other classes; gradients finite).
* Degenerate input (masks keeping too few rows, B = 0, a mask of a non-numeric dtype) raises a
  ValueError/TypeError naming the argument; second-order gradients raise a clear RuntimeError.
"""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels.reference import geometry as RG
from kd_kernels.reference import logit as RL
from kd_kernels.reference import sinkhorn as RS
from kd_kernels.testing import assert_close, require, tolerance

NAN, INF = float("nan"), float("inf")

# public name -> (call(student, teacher, backend), "feature" | "logit", shape of each input)
LOSSES = {
    "rkd_distance_loss": (lambda s, t, b: kd_kernels.rkd_distance_loss(s, t, backend=b), "feature", (9, 5)),
    "rkd_distance_loss[none]": (
        lambda s, t, b: kd_kernels.rkd_distance_loss(s, t, reduction="none", backend=b),
        "feature",
        (9, 5),
    ),
    "rkd_angle_loss": (lambda s, t, b: kd_kernels.rkd_angle_loss(s, t, backend=b), "feature", (9, 5)),
    "rkd_angle_loss[none]": (
        lambda s, t, b: kd_kernels.rkd_angle_loss(s, t, reduction="none", backend=b),
        "feature",
        (9, 5),
    ),
    "rkd_loss": (lambda s, t, b: kd_kernels.rkd_loss(s, t, backend=b), "feature", (9, 5)),
    "gram_loss": (lambda s, t, b: kd_kernels.gram_loss(s, t, backend=b), "feature", (9, 5)),
    "gram_loss[D>N]": (lambda s, t, b: kd_kernels.gram_loss(s, t, backend=b), "feature", (2, 4, 7)),
    "cka_loss": (lambda s, t, b: kd_kernels.cka_loss(s, t, backend=b), "feature", (9, 5)),
    "cka_loss[unbiased]": (lambda s, t, b: kd_kernels.cka_loss(s, t, unbiased=True, backend=b), "feature", (9, 5)),
    "relation_loss": (lambda s, t, b: kd_kernels.relation_loss(s, t, backend=b), "feature", (2, 9, 5)),
    "procrustes_loss": (lambda s, t, b: kd_kernels.procrustes_loss(s, t, backend=b), "feature", (9, 5)),
    "procrustes_loss[batched]": (lambda s, t, b: kd_kernels.procrustes_loss(s, t, backend=b), "feature", (3, 9, 5)),
    "sinkhorn_loss": (lambda s, t, b: kd_kernels.sinkhorn_loss(s, t, backend=b), "logit", (9, 5)),
    "sinkhorn": (
        lambda s, t, b: kd_kernels.sinkhorn(torch.cdist(s, t), n_iters=10, backend=b),
        "feature",
        (2, 6, 3),
    ),
    "kd_loss": (lambda s, t, b: kd_kernels.kd_loss(s, t, backend=b), "logit", (9, 5)),
    "reverse_kl_loss": (lambda s, t, b: kd_kernels.reverse_kl_loss(s, t, backend=b), "logit", (9, 5)),
    "jsd_loss": (lambda s, t, b: kd_kernels.jsd_loss(s, t, backend=b), "logit", (9, 5)),
    "jsd_loss[beta=0]": (lambda s, t, b: kd_kernels.jsd_loss(s, t, beta=0.0, backend=b), "logit", (9, 5)),
    "jsd_loss[beta=1]": (lambda s, t, b: kd_kernels.jsd_loss(s, t, beta=1.0, backend=b), "logit", (9, 5)),
    "tvd_loss": (lambda s, t, b: kd_kernels.tvd_loss(s, t, backend=b), "logit", (9, 5)),
    "dist_loss": (lambda s, t, b: kd_kernels.dist_loss(s, t, backend=b), "logit", (9, 5)),
    "grkd_loss": (lambda s, t, b: kd_kernels.grkd_loss(s, t, backend=b), "logit", (9, 5)),
    "grkd_loss[top_k]": (lambda s, t, b: kd_kernels.grkd_loss(s, t, top_k=2, backend=b), "logit", (9, 5)),
}
RKD = ("rkd_distance_loss", "rkd_distance_loss[none]", "rkd_angle_loss", "rkd_angle_loss[none]", "rkd_loss")


def _public(case: str) -> str:
    return case.split("[")[0]


# (which input, what, where): a single bad entry, or the whole teacher.
BAD = {
    "nan_student": ("student", NAN, "one"),
    "nan_teacher": ("teacher", NAN, "one"),
    "inf_student": ("student", INF, "one"),
    "inf_teacher": ("teacher", INF, "one"),
    "neg_inf_student_features": ("student", -INF, "one"),
    "all_nan_teacher": ("teacher", NAN, "all"),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("case", list(LOSSES))
def test_non_finite_input_gives_non_finite_loss(case, bad, backend):
    device = require(backend, _public(case))
    fn, kind, shape = LOSSES[case]
    which, value, where = BAD[bad]
    if bad == "neg_inf_student_features" and kind == "logit":
        pytest.skip("-inf logits are vocabulary masking (tested below), not bad input")
    s = torch.randn(shape, device=device)
    t = torch.randn(shape, device=device)
    x = s if which == "student" else t
    if where == "all":
        x.fill_(value)
    else:
        x[(0,) * (x.dim() - 2) + (2, 1)] = value
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = fn(s, t, backend)
    assert not bool(torch.isfinite(loss).all()), f"{case}: {bad} gave a finite loss {loss}"
    loss.sum().backward()  # never raises (no LinAlgError from the SVD, no assertion)
    if case in RKD:  # the original bug: the student got a finite gradient from garbage
        assert not bool(torch.isfinite(s.grad).all()), f"{case}: {bad} gave a finite student gradient"


def test_procrustes_non_finite_never_raises_linalg_error():
    """NaN in one batch item: that item is NaN, the call neither raises nor syncs the error out."""
    s, t = torch.randn(3, 9, 5), torch.randn(3, 9, 5)
    s[1, 4, 2] = NAN
    loss = kd_kernels.procrustes_loss(s, t)
    assert torch.isnan(loss)
    # the other items are untouched: their mean equals the loss without the bad item
    good = kd_kernels.procrustes_loss(s[[0, 2]].double(), t[[0, 2]].double())
    ref = RG.procrustes_loss(s[[0, 2]].double(), t[[0, 2]].double())
    assert_close(good, ref)


# ------------------------------------------------------------------------ −inf logits: masking
# Losses whose value on a row does not change when classes of probability 0 in both
# distributions are removed: compared with the float64 reference on the kept columns.
MASKABLE = {
    "kd_loss": (kd_kernels.kd_loss, RL.kd_loss, {}),
    "reverse_kl_loss": (kd_kernels.reverse_kl_loss, RL.reverse_kl_loss, {}),
    "jsd_loss": (kd_kernels.jsd_loss, RL.jsd_loss, {}),
    "jsd_loss[beta=0.2]": (kd_kernels.jsd_loss, RL.jsd_loss, {"beta": 0.2}),
    "jsd_loss[beta=0]": (kd_kernels.jsd_loss, RL.jsd_loss, {"beta": 0.0}),
    "jsd_loss[beta=1]": (kd_kernels.jsd_loss, RL.jsd_loss, {"beta": 1.0}),
    "tvd_loss": (kd_kernels.tvd_loss, RL.tvd_loss, {}),
    "sinkhorn_loss": (kd_kernels.sinkhorn_loss, RS.sinkhorn_loss, {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(MASKABLE))
def test_masked_vocabulary_equals_loss_on_kept_classes(case, dtype, backend):
    device = require(backend, _public(case))
    fn, ref, kw = MASKABLE[case]
    n, c = 7, 9
    masked, kept = torch.tensor([1, 4, 8]), torch.tensor([0, 2, 3, 5, 6, 7])
    s = torch.randn(n, c, dtype=torch.float64) * 2
    t = torch.randn(n, c, dtype=torch.float64) * 2
    sm, tm = s.clone(), t.clone()
    sm[:, masked] = -INF
    tm[:, masked] = -INF
    sm = sm.to(device, dtype).requires_grad_(True)
    tm = tm.to(device, dtype).requires_grad_(True)
    loss = fn(sm, tm, backend=backend, **kw)
    loss.backward()
    assert torch.isfinite(loss), f"{case}: masked classes gave {loss}"
    assert torch.isfinite(sm.grad).all() and torch.isfinite(tm.grad).all(), f"{case}: non-finite gradient"
    assert (sm.grad[:, masked] == 0).all() and (tm.grad[:, masked] == 0).all()
    # float64 reference on the kept columns only
    sk = s[:, kept].clone().requires_grad_(True)
    tk = t[:, kept].clone().requires_grad_(True)
    want = ref(sk, tk, **kw)
    want.backward()
    rtol, atol = tolerance(dtype, backend)
    assert_close(loss, want, rtol=rtol, atol=atol, name=f"{case} value")
    assert_close(sm.grad[:, kept], sk.grad, rtol=rtol, atol=atol, name=f"{case} grad student")
    assert_close(tm.grad[:, kept], tk.grad, rtol=rtol, atol=atol, name=f"{case} grad teacher")


@pytest.mark.parametrize("name", ["dist_loss", "grkd_loss"])
def test_masked_vocabulary_finite_for_relation_losses(name, backend):
    """DIST and GRKD are not invariant to removing classes (the class statistics / pair counts
    include them), but masked classes must still give a finite loss and gradient."""
    device = require(backend, name)
    s, t = torch.randn(6, 8, device=device), torch.randn(6, 8, device=device)
    s[:, [2, 5]] = -INF
    t[:, [2, 5]] = -INF
    s.requires_grad_(True)
    loss = getattr(kd_kernels, name)(s, t, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_masked_vocabulary_teacher_only_is_zero_probability(backend):
    """KD with −inf only in the teacher: those classes have p = 0 and contribute 0 (0·log 0)."""
    device = require(backend, "kd_loss")
    s = torch.randn(5, 6, dtype=torch.float64, device=device)
    t = torch.randn(5, 6, dtype=torch.float64, device=device)
    t[:, [0, 3]] = -INF
    loss = kd_kernels.kd_loss(s, t, temperature=1.0, backend=backend)
    lp, lq = torch.log_softmax(t, 1), torch.log_softmax(s, 1)
    keep = [1, 2, 4, 5]
    want = (lp[:, keep].exp() * (lp[:, keep] - lq[:, keep])).sum() / 5
    assert_close(loss, want)


def test_minus_inf_where_the_other_side_has_mass_is_inf(backend):
    """As KL does: q = 0 where p > 0 gives KL(p||q) = +inf (not NaN); likewise reverse KL."""
    device = require(backend, "kd_loss")
    s, t = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    s_bad = s.clone()
    s_bad[1, 2] = -INF
    assert kd_kernels.kd_loss(s_bad, t, backend=backend) == INF
    if "reverse_kl_loss" in kd_kernels.losses.logit._KERNELS and backend in kd_kernels.losses.logit._KERNELS[
        "reverse_kl_loss"
    ]:
        t_bad = t.clone()
        t_bad[1, 2] = -INF
        assert kd_kernels.reverse_kl_loss(s, t_bad, backend=backend) == INF


# ------------------------------------------------------------------------------ degenerate input
GEOMETRY = {
    "gram_loss": ({}, 2),
    "procrustes_loss": ({}, 2),
    "cka_loss": ({}, 2),
    "cka_loss[unbiased]": ({"unbiased": True}, 4),
    "relation_loss": ({}, 1),
}


@pytest.mark.parametrize("case", list(GEOMETRY))
def test_mask_keeping_too_few_rows_raises(case):
    kw, need = GEOMETRY[case]
    fn = getattr(kd_kernels, _public(case))
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    with pytest.raises(ValueError, match=rf"{_public(case)}: mask must keep at least {need} rows.*all-False"):
        fn(s, t, mask=torch.zeros(8, dtype=torch.bool), **kw)
    few = torch.zeros(8, dtype=torch.int64)
    few[: need - 1] = 1
    if need > 1:
        with pytest.raises(ValueError, match=rf"{_public(case)}: mask must keep at least {need} rows"):
            fn(s, t, mask=few, **kw)
    few[need - 1] = 1  # exactly enough: fine and finite
    assert torch.isfinite(fn(s, t, mask=few, **kw))
    # batched: one item without rows
    m = torch.ones(3, 8, dtype=torch.bool)
    m[2] = False
    with pytest.raises(ValueError, match=rf"{_public(case)}: mask .* in item 2"):
        fn(torch.randn(3, 8, 5), torch.randn(3, 8, 5), mask=m, **kw)


@pytest.mark.parametrize("case", list(GEOMETRY))
def test_empty_batch_raises(case):
    kw, _ = GEOMETRY[case]
    fn = getattr(kd_kernels, _public(case))
    with pytest.raises(ValueError, match=rf"{_public(case)}: student must have at least one item \(B >= 1\)"):
        fn(torch.randn(0, 8, 5), torch.randn(0, 8, 5), **kw)


def test_sinkhorn_empty_batch_raises():
    with pytest.raises(ValueError, match=r"sinkhorn: cost \[B, n, m\] must have at least one problem"):
        kd_kernels.sinkhorn(torch.randn(0, 4, 5))


@pytest.mark.parametrize(
    ("name", "n", "kw"),
    [
        ("rkd_distance_loss", 1, {}),
        ("rkd_loss", 1, {}),
        ("gram_loss", 1, {}),
        ("procrustes_loss", 1, {}),
        ("cka_loss", 1, {}),
        ("cka_loss", 3, {"unbiased": True}),
        ("kd_loss", 0, {}),
        ("sinkhorn_loss", 0, {}),
    ],
)
def test_too_few_rows_raises(name, n, kw):
    with pytest.raises(ValueError, match=rf"{name}: needs at least \d rows"):
        getattr(kd_kernels, name)(torch.randn(n, 5), torch.randn(n, 5), **kw)


@pytest.mark.parametrize("name", ["gram_loss", "cka_loss", "relation_loss", "procrustes_loss", "kd_loss", "dist_loss"])
def test_mask_of_wrong_dtype_raises(name):
    arg = "ignore_mask" if name in ("kd_loss", "dist_loss") else "mask"
    with pytest.raises(TypeError, match=rf"{name}: {arg} must be a bool tensor"):
        getattr(kd_kernels, name)(torch.randn(8, 5), torch.randn(8, 5), **{arg: torch.ones(8, dtype=torch.complex64)})


@pytest.mark.parametrize("name", ["kd_loss", "reverse_kl_loss", "jsd_loss", "tvd_loss", "dist_loss", "grkd_loss"])
def test_ignore_mask_dropping_every_row_is_documented_zero(name):
    """Documented in kd_kernels/losses/logit.py: every row dropped gives loss 0 and zero
    gradients (a batch of padding/prompt tokens only), never NaN."""
    s = torch.randn(6, 5).requires_grad_(True)
    loss = getattr(kd_kernels, name)(s, torch.randn(6, 5), ignore_mask=torch.ones(6, dtype=torch.bool))
    loss.backward()
    assert loss == 0 and (s.grad == 0).all()


# ------------------------------------------------------------------------ second-order gradients
SECOND_ORDER = [c for c in LOSSES if "[" not in c]


@pytest.mark.parametrize("case", SECOND_ORDER)
def test_double_backward_raises_clear_error(case, backend):
    device = require(backend, _public(case))
    fn, _, shape = LOSSES[case]
    s = torch.randn(shape, device=device, requires_grad=True)
    t = torch.randn(shape, device=device)
    loss = fn(s, t, backend).sum()
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients .* are not supported"):
        g.pow(2).sum().backward()


@pytest.mark.parametrize("name", ["gram_loss", "procrustes_loss", "cka_loss"])
def test_all_false_mask_under_compile_is_nan_not_an_error(name):
    """The kept-row check reads the mask, so it runs in eager mode only; a compiled call
    (fullgraph, no graph break) gives NaN instead, never a LinAlgError."""
    fn = torch.compile(getattr(kd_kernels, name), fullgraph=True, backend="aot_eager")
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    assert torch.isfinite(fn(s, t, mask=torch.ones(8, dtype=torch.bool)))
    assert torch.isnan(fn(s, t, mask=torch.zeros(8, dtype=torch.bool)))
