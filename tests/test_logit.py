"""Tests of the logit losses (kd, reverse_kl, jsd, tvd, dist, grkd): the PyTorch path against
the float64 reference, gradients, ops, torch.compile, modules, masks, edge cases, bad input."""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels import functional as KF
from kd_kernels import nn as KN
from kd_kernels.ops import logit as logit_ops
from kd_kernels.reference import logit as ref
from kd_kernels.testing import assert_close, assert_close_2x, assert_matches_reference, require, value_and_grads
from kd_kernels.torch_impl import logit as impl

DIVERGENCES = ("kd_loss", "reverse_kl_loss", "jsd_loss", "tvd_loss")
ALL = (*DIVERGENCES, "dist_loss", "grkd_loss")
REDUCTIONS = ("batchmean", "sum", "mean", "none")
MODULES = {
    "kd_loss": KN.KDLoss,
    "reverse_kl_loss": KN.ReverseKLLoss,
    "jsd_loss": KN.JSDLoss,
    "tvd_loss": KN.TVDLoss,
    "dist_loss": KN.DISTLoss,
    "grkd_loss": KN.GRKDLoss,
}

# (loss, kwargs): every flag of every loss, temperatures != 1, the JSD endpoints.
CASES = [
    ("kd_loss", {}),
    ("kd_loss", {"temperature": 1.0}),
    ("kd_loss", {"temperature": 2.5, "reduction": "sum"}),
    ("reverse_kl_loss", {}),
    ("reverse_kl_loss", {"temperature": 3.0, "reduction": "mean"}),
    ("jsd_loss", {"beta": 0.0}),
    ("jsd_loss", {"beta": 0.3}),
    ("jsd_loss", {"beta": 0.5}),
    ("jsd_loss", {"beta": 1.0}),
    ("jsd_loss", {"beta": 0.0, "temperature": 2.0}),
    ("jsd_loss", {"beta": 0.3, "temperature": 2.0}),
    ("jsd_loss", {"beta": 1.0, "temperature": 0.5}),
    ("tvd_loss", {}),
    ("tvd_loss", {"temperature": 2.0}),
    ("dist_loss", {}),
    ("dist_loss", {"temperature": 4.0}),
    ("dist_loss", {"temperature": 2.0, "inter_weight": 2.0, "intra_weight": 0.5}),
    ("dist_loss", {"inter_weight": 0.0}),
    ("grkd_loss", {}),
    ("grkd_loss", {"temperature": 2.0}),
    ("grkd_loss", {"top_k": 3}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in CASES]


def _fns(name):
    return getattr(KF, name), getattr(ref, name)


def _logits(n, c, dtype=torch.float64, scale=2.0, teacher_grad=True, device="cpu"):
    s = (scale * torch.randn(n, c, dtype=torch.float64, device=device)).to(dtype)
    t = (scale * torch.randn(n, c, dtype=torch.float64, device=device)).to(dtype).requires_grad_(teacher_grad)
    return s, t


def _on(fn, backend):
    """The public function ``fn`` with ``backend=backend``."""
    return lambda a, b, **kw: fn(a, b, backend=backend, **kw)


def _grad_output(name, kwargs, n):
    if kwargs.get("reduction") == "none":
        return torch.randn(n, dtype=torch.float64)
    return torch.tensor(0.37, dtype=torch.float64)


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(backend, name, kwargs, dtype):
    fn, rf = _fns(name)
    s, t = _logits(6, 13, dtype, device=require(backend, name))
    go = _grad_output(name, kwargs, 6)
    assert_matches_reference(fn, rf, s, t, grad_output=go, name=name, backend=backend, **kwargs)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masking", ["none", "some", "all"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reductions_and_ignore_mask(backend, name, reduction, masking, dtype):
    fn, rf = _fns(name)
    device = require(backend, name)
    n = 7
    s, t = _logits(n, 10, dtype, device=device)
    mask = {
        "none": None,
        "some": torch.tensor([0, 1, 0, 0, 1, 1, 0], dtype=torch.bool, device=device),
        "all": torch.ones(n, dtype=torch.bool, device=device),
    }[masking]
    kw = {"reduction": reduction, "ignore_mask": mask}
    go = torch.randn(n, dtype=torch.float64) if reduction == "none" else torch.tensor(1.3, dtype=torch.float64)
    assert_matches_reference(fn, rf, s, t, grad_output=go, name=name, backend=backend, **kw)
    v, gs, gt = value_and_grads(_on(fn, backend), s, t, grad_output=go, **kw)
    assert torch.isfinite(v).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    if masking == "all":
        assert (v == 0).all() and (gs == 0).all() and (gt == 0).all()


@pytest.mark.parametrize("name", ALL)
def test_masked_equals_unmasked_on_kept_rows(name):
    fn = getattr(KF, name)
    s, t = _logits(8, 9, torch.float32, teacher_grad=False)
    mask = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.uint8)  # 0/1 integers are accepted too
    keep = mask == 0
    v_m, g_m, _ = value_and_grads(fn, s, t, ignore_mask=mask)
    v_k, g_k, _ = value_and_grads(fn, s[keep], t[keep])
    assert_close(v_m, v_k, name=f"{name} value")
    assert_close(g_m[keep], g_k, name=f"{name} grad kept")
    assert (g_m[~keep] == 0).all()


def test_ignored_rows_with_nonfinite_logits_do_not_leak():
    s, t = _logits(4, 6, torch.float32, teacher_grad=True)
    s, t = s.detach().clone(), t.detach().clone()
    s[1] = float("nan")
    t[1, 2] = float("inf")
    mask = torch.tensor([False, True, False, False])
    for name in ALL:
        fn = getattr(KF, name)
        t_ = t.clone().requires_grad_(name != "grkd_loss")
        v, gs, gt = value_and_grads(fn, s, t_, ignore_mask=mask)
        v_k, gs_k, _ = value_and_grads(fn, s[~mask], t[~mask])
        assert_close(v, v_k, name=name)
        assert_close(gs[~mask], gs_k, name=name)
        assert torch.isfinite(gs).all() and (gt is None or torch.isfinite(gt).all()), name


@pytest.mark.parametrize("name", ["dist_loss", "grkd_loss"])
def test_all_rows_ignored_no_reduction_losses(name):
    fn = getattr(KF, name)
    s, t = _logits(5, 7, torch.float32, teacher_grad=name == "dist_loss")
    v, gs, gt = value_and_grads(fn, s, t, ignore_mask=torch.ones(5, dtype=torch.bool))
    assert v.item() == 0.0 and (gs == 0).all()
    assert gt is None or (gt == 0).all()
    rv, _, _ = value_and_grads(getattr(ref, name), s, t, ignore_mask=torch.ones(5, dtype=torch.bool))
    assert rv.item() == 0.0


@pytest.mark.parametrize("name,kwargs", [c for c in CASES if c[1].get("temperature", 1.0) <= 1.0], ids=str)
def test_extreme_logits(name, kwargs):
    fn, rf = _fns(name)
    s, t = _logits(5, 17, torch.float64, scale=1e4)
    assert_matches_reference(
        fn, rf, s, t, grad_output=_grad_output(name, kwargs, 5), name=name, rtol=1e-9, atol=1e-9, **kwargs
    )
    # float32: ~1e4-scale logits lose ~1e-3 absolute in log-probabilities, so compare loosely
    v, gs, gt = value_and_grads(fn, s.float(), t.float(), **kwargs)
    rv, rgs, _ = value_and_grads(rf, s, t, **kwargs)
    assert torch.isfinite(v).all() and torch.isfinite(gs).all() and (gt is None or torch.isfinite(gt).all())
    assert_close(v, rv, rtol=1e-4, atol=1e-3, name=f"{name} fp32 value")
    assert_close(gs, rgs, rtol=1e-3, atol=1e-3, name=f"{name} fp32 grad")


@pytest.mark.parametrize("name", ALL)
def test_single_class(backend, name):
    # C = 1: every distribution is the point mass, so KL/JSD/TVD are 0 and GRKD has no pairs;
    # DIST has zero-variance rows (inter term 1) and is compared with the reference.
    fn, rf = _fns(name)
    s, t = _logits(4, 1, device=require(backend, name))
    assert_matches_reference(fn, rf, s, t, name=name, backend=backend)
    if name != "dist_loss":
        assert fn(s, t, backend=backend).item() == 0.0


@pytest.mark.parametrize("name", ALL)
def test_odd_num_classes(backend, name):
    fn, rf = _fns(name)
    s, t = _logits(3, 1271, torch.float32, device=require(backend, name))
    kw = {"top_k": 40} if name == "grkd_loss" else {}
    assert_matches_reference(fn, rf, s, t, name=name, backend=backend, **kw)


@pytest.mark.parametrize("kind", ["kd", "reverse_kl", "jsd", "tvd"])
def test_chunk_boundaries_divergence(kind):
    s, t = _logits(7, 11, torch.float64)
    s, t = s.detach(), t.detach()
    mask = torch.tensor([0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    for m in (None, mask):
        full = impl.divergence_fwd(kind, s, t, 1.7, 0.3, m)
        go = torch.randn(7, dtype=torch.float64)
        gfull = impl.divergence_bwd(kind, go, s, t, full[1], full[2], 1.7, 0.3, m, True, True)
        for rows in (1, 2, 3, 6):
            part = impl.divergence_fwd(kind, s, t, 1.7, 0.3, m, chunk_rows=rows)
            gpart = impl.divergence_bwd(kind, go, s, t, part[1], part[2], 1.7, 0.3, m, True, True, chunk_rows=rows)
            for a, b in zip((*part, *gpart), (*full, *gfull)):
                assert_close(a, b, name=f"{kind} chunk_rows={rows}")


def test_chunk_boundaries_dist_and_grkd():
    s, t = _logits(7, 11, torch.float64)
    s, t = s.detach(), t.detach()
    mask = torch.tensor([0, 1, 1, 0, 0, 0, 1], dtype=torch.bool)
    go = torch.tensor(0.37, dtype=torch.float64)
    for m in (None, mask):
        full = impl.dist_fwd(s, t, 2.0, 1.5, 0.5, m)
        gfull = impl.dist_bwd(go, s, t, *full[1:], 2.0, 1.5, 0.5, m, True, True)
        for rows in (1, 2, 3, 4):
            part = impl.dist_fwd(s, t, 2.0, 1.5, 0.5, m, chunk_rows=rows)
            gpart = impl.dist_bwd(go, s, t, *part[1:], 2.0, 1.5, 0.5, m, True, True, chunk_rows=rows)
            for a, b in zip((*part, *gpart), (*full, *gfull)):
                assert_close(a, b, name=f"dist chunk_rows={rows}")
        for top_k in (None, 4):
            loss, pairs = impl.grkd_fwd(s, t, 1.5, top_k, m)
            g = impl.grkd_bwd(go, s, t, pairs, 1.5, top_k, m)
            for tile in (11, 22, 33, 50, 121):  # 1 row x 1 class, 1 x 2, 1 x 3, 4 x 1, 1 x 11
                loss2, pairs2 = impl.grkd_fwd(s, t, 1.5, top_k, m, tile_elements=tile)
                g2 = impl.grkd_bwd(go, s, t, pairs2, 1.5, top_k, m, tile_elements=tile)
                assert_close(loss2, loss, name=f"grkd tile={tile}")
                assert (pairs2 == pairs).all()
                assert_close(g2, g, name=f"grkd grad tile={tile}")


@pytest.mark.parametrize("name", ALL)
def test_tiny_chunks_through_public_path(name, monkeypatch):
    monkeypatch.setattr(impl, "CHUNK_ELEMENTS", 20)  # C = 9 -> 2 rows per chunk
    monkeypatch.setattr(impl, "PAIR_TILE_ELEMENTS", 20)
    fn, rf = _fns(name)
    s, t = _logits(7, 9)
    assert_matches_reference(fn, rf, s, t, grad_output=torch.tensor(0.37, dtype=torch.float64), name=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grkd_ties_and_top_k(dtype):
    s = torch.randn(6, 12, dtype=dtype)
    t = torch.randint(0, 4, (6, 12)).to(dtype)  # many ties (excluded pairs)
    t[0] = 1.0  # a row with no pair at all contributes 0
    t[1, :6] = torch.arange(6, 0, -1, dtype=dtype) + 10.0  # distinct top 6 (no tie at the top-k boundary)
    for kw in ({}, {"top_k": 1}, {"top_k": 5}, {"temperature": 0.5}):
        assert_matches_reference(KF.grkd_loss, ref.grkd_loss, s, t, name=f"grkd {kw}", **kw)
    # top_k >= C means every class
    assert_close(KF.grkd_loss(s, t, top_k=12), KF.grkd_loss(s, t))
    assert_close(KF.grkd_loss(s, t, top_k=50), KF.grkd_loss(s, t))
    # row 0 has no pairs: its loss is 0, and it still counts in the mean over rows
    assert_close(KF.grkd_loss(s[:1], t[:1]), torch.zeros((), dtype=dtype))
    assert_close(KF.grkd_loss(s[:2], t[:2]) * 2, KF.grkd_loss(s[1:2], t[1:2]))


GRADCHECK_CASES = [
    ("kd_loss", {"temperature": 2.0}),
    ("kd_loss", {"reduction": "none", "ignore_mask": torch.tensor([False, True, False])}),
    ("reverse_kl_loss", {"temperature": 1.5, "reduction": "mean"}),
    ("jsd_loss", {"beta": 0.3, "temperature": 2.0}),
    ("jsd_loss", {"beta": 0.0}),
    ("jsd_loss", {"beta": 1.0, "reduction": "sum"}),
    ("tvd_loss", {"temperature": 2.0}),
    ("dist_loss", {"temperature": 2.0, "inter_weight": 1.5}),
    ("dist_loss", {"ignore_mask": torch.tensor([False, True, False])}),
    ("grkd_loss", {"temperature": 1.5}),
    ("grkd_loss", {"top_k": 2, "ignore_mask": torch.tensor([False, True, False])}),
]


@pytest.mark.parametrize("name,kwargs", GRADCHECK_CASES, ids=str)
def test_gradcheck(name, kwargs):
    fn = getattr(KF, name)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, requires_grad=name != "grkd_loss")
    inputs = (s, t) if t.requires_grad else (s,)
    assert torch.autograd.gradcheck(lambda *x: fn(*x, *((t,) if len(x) == 1 else ()), **kwargs), inputs)


def _opcheck_samples():
    s = torch.randn(4, 6)
    t = torch.randn(4, 6)
    m = torch.tensor([False, True, False, False])
    out = []
    for op, scalars in (
        (logit_ops.kd_fwd, (2.0,)),
        (logit_ops.reverse_kl_fwd, (1.0,)),
        (logit_ops.jsd_fwd, (0.3, 1.5)),
        (logit_ops.tvd_fwd, (1.0,)),
    ):
        out.append((op, (s, t, *scalars, None, "torch")))
        out.append((op, (s.double().requires_grad_(), t.double().requires_grad_(), *scalars, m, "torch")))
    out.append((logit_ops.dist_fwd, (s, t, 2.0, 1.0, 0.5, None, "torch")))
    out.append((logit_ops.dist_fwd, (s.requires_grad_(), t, 1.0, 1.0, 1.0, m, "torch")))
    out.append((logit_ops.grkd_fwd, (s, t, 1.0, None, None, "torch")))
    out.append((logit_ops.grkd_fwd, (s.detach().requires_grad_(), t, 2.0, 3, m, "torch")))
    return out


@pytest.mark.parametrize("i", range(12))
def test_opcheck_forward_ops(i):
    op, args = _opcheck_samples()[i]
    torch.library.opcheck(op, args)


def test_opcheck_backward_ops():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    m = torch.tensor([True, False, False, False])
    go = torch.randn(4)
    for fwd, bwd, scalars in (
        (logit_ops.kd_fwd, logit_ops.kd_bwd, (2.0,)),
        (logit_ops.reverse_kl_fwd, logit_ops.reverse_kl_bwd, (1.0,)),
        (logit_ops.jsd_fwd, logit_ops.jsd_bwd, (0.5, 1.0)),
        (logit_ops.tvd_fwd, logit_ops.tvd_bwd, (1.0,)),
    ):
        _, lse_s, lse_t = fwd(s, t, *scalars, m, "torch")
        torch.library.opcheck(bwd, (go, s, t, lse_s, lse_t, *scalars, m, True, True, "torch"))
        torch.library.opcheck(bwd, (go, s, t, lse_s, lse_t, *scalars, None, True, False, "torch"))
    g = torch.tensor(0.5)
    _, lse_s, lse_t, stats = logit_ops.dist_fwd(s, t, 2.0, 1.0, 1.0, m, "torch")
    torch.library.opcheck(logit_ops.dist_bwd, (g, s, t, lse_s, lse_t, stats, 2.0, 1.0, 1.0, m, True, True, "torch"))
    torch.library.opcheck(logit_ops.dist_bwd, (g, s, t, lse_s, lse_t, stats, 2.0, 1.0, 1.0, None, False, True, "torch"))
    _, pairs = logit_ops.grkd_fwd(s, t, 1.0, 2, m, "torch")
    torch.library.opcheck(logit_ops.grkd_bwd, (g, s, t, pairs, 1.0, 2, m, "torch"))


def test_op_without_kernel_raises():
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(NotImplementedError, match="cuda"):  # GRKD has no CUDA C++ kernel (yet)
        logit_ops.grkd_fwd(s, t, 1.0, None, None, "cuda")


COMPILE_CASES = [
    ("kd_loss", {}, "inductor"),
    ("kd_loss", {"reduction": "none"}, "aot_eager"),
    ("reverse_kl_loss", {"reduction": "mean"}, "inductor"),
    ("jsd_loss", {"beta": 0.3}, "inductor"),
    ("jsd_loss", {"beta": 1.0, "reduction": "sum"}, "aot_eager"),
    ("tvd_loss", {}, "inductor"),
    ("dist_loss", {"temperature": 2.0}, "inductor"),
    ("grkd_loss", {"top_k": 3}, "inductor"),
    ("grkd_loss", {}, "aot_eager"),
]


@pytest.mark.parametrize("name,kwargs,backend", COMPILE_CASES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_torch_compile(name, kwargs, backend, masked):
    if masked and backend == "inductor":
        backend = "aot_eager"  # one inductor compile per case keeps the suite fast
    fn = getattr(KF, name)
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    s, t = _logits(5, 8, torch.float32, teacher_grad=name != "grkd_loss")
    kw = dict(kwargs, ignore_mask=torch.tensor([0, 1, 0, 0, 1], dtype=torch.bool)) if masked else kwargs
    go = torch.randn(5) if kwargs.get("reduction") == "none" else None
    v, gs, gt = value_and_grads(fn, s, t, grad_output=go, **kw)
    cv, cgs, cgt = value_and_grads(compiled, s, t, grad_output=go, **kw)
    assert_close(cv, v, name="value")
    assert_close(cgs, gs, name="grad student")
    assert_close(cgt, gt, name="grad teacher")


@pytest.mark.parametrize("name,kwargs", CASES[::3], ids=CASE_IDS[::3])
def test_functional_equals_module(name, kwargs):
    fn, mod = getattr(KF, name), MODULES[name](**kwargs)
    s, t = _logits(5, 7, torch.float32)
    mask = torch.tensor([False, False, True, False, False])
    assert_close(mod(s, t), fn(s, t, **kwargs))
    assert_close(mod(s, t, mask), fn(s, t, ignore_mask=mask, **kwargs))
    assert getattr(kd_kernels, name) is fn and getattr(kd_kernels, type(mod).__name__) is type(mod)


def test_module_defaults_match_functions():
    import inspect

    for name, cls in MODULES.items():
        fn_params = inspect.signature(getattr(KF, name)).parameters
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name != "self":
                assert p.default == fn_params[p.name].default, (name, p.name)


def test_signatures():
    import inspect

    expected = {
        "kd_loss": "(student_logits, teacher_logits, *, temperature=4.0, reduction='batchmean', "
        "ignore_mask=None, backend='auto')",
        "reverse_kl_loss": "(student_logits, teacher_logits, *, temperature=1.0, reduction='batchmean', "
        "ignore_mask=None, backend='auto')",
        "jsd_loss": "(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, reduction='batchmean', "
        "ignore_mask=None, backend='auto')",
        "tvd_loss": "(student_logits, teacher_logits, *, temperature=1.0, reduction='batchmean', "
        "ignore_mask=None, backend='auto')",
        "dist_loss": "(student_logits, teacher_logits, *, temperature=1.0, inter_weight=1.0, intra_weight=1.0, "
        "ignore_mask=None, backend='auto')",
        "grkd_loss": "(student_logits, teacher_logits, *, temperature=1.0, top_k=None, ignore_mask=None, "
        "backend='auto')",
    }
    for name, sig in expected.items():
        params = inspect.signature(getattr(KF, name)).parameters.values()
        got = (
            "("
            + ", ".join(
                (("*, " if p.kind == p.KEYWORD_ONLY and i == 2 else "") + p.name)
                + ("" if p.default is inspect.Parameter.empty else f"={p.default!r}")
                for i, p in enumerate(params)
            )
            + ")"
        )
        assert got == sig


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_n(backend, name, n):
    fn, rf = _fns(name)
    s, t = _logits(n, 6, device=require(backend, name))
    assert_matches_reference(fn, rf, s, t, name=name, backend=backend)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_duplicated_rows(backend, name, dtype):
    fn, rf = _fns(name)
    s, t = _logits(4, 7, dtype, device=require(backend, name))
    s = s[[0, 1, 1, 2, 3, 3, 3]]
    t = t.detach()[[0, 1, 1, 2, 3, 3, 3]].requires_grad_(True)
    assert_matches_reference(fn, rf, s, t, name=name, backend=backend)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_non_contiguous(backend, name, dtype):
    fn, rf = _fns(name)
    device = require(backend, name)
    base_s = torch.randn(9, 12, dtype=dtype, device=device)
    base_t = torch.randn(12, 5, dtype=dtype, device=device)
    s = base_s[::2, ::2]  # strided view [5, 6]
    t = base_t.t()[:, 3:9].requires_grad_(True)  # transposed view [5, 6]
    assert not s.is_contiguous() and not t.is_contiguous()
    assert_matches_reference(fn, rf, s, t, name=name, backend=backend)


@pytest.mark.parametrize("name", ALL)
def test_teacher_without_grad(backend, name):
    fn, rf = _fns(name)
    s, t = _logits(4, 6, torch.float32, teacher_grad=False, device=require(backend, name))
    v, gs, gt = value_and_grads(_on(fn, backend), s, t)
    assert gt is None and gs is not None and torch.isfinite(v)
    assert_matches_reference(fn, rf, s, t, grad_output=torch.tensor(0.37), name=name, backend=backend)


def test_grkd_teacher_gets_no_gradient():
    s, t = _logits(4, 6, torch.float32, teacher_grad=True)
    _, gs, gt = value_and_grads(KF.grkd_loss, s, t)
    _, _, rgt = value_and_grads(ref.grkd_loss, s, t)
    assert gt is None and rgt is None and gs is not None


@pytest.mark.parametrize("name,kwargs", CASES[::2], ids=CASE_IDS[::2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, name, kwargs, dtype):
    fn, rf = _fns(name)
    s, t = _logits(6, 16, dtype, device=require(backend, name))
    v, gs, gt = value_and_grads(_on(fn, backend), s, t, **kwargs)
    assert v.dtype == dtype and gs.dtype == dtype and (gt is None or gt.dtype == dtype)
    rv, rgs, rgt = value_and_grads(rf, s, t, dtype=torch.float64, **kwargs)
    bv, bgs, bgt = value_and_grads(rf, s.float(), t.float(), **kwargs)  # fp32 yardstick
    bv, bgs = bv.to(dtype), bgs.to(dtype)  # ... rounded to the low-precision dtype
    assert_close_2x(v, rv, bv, name="value", floor=1e-3 * (1 + rv.abs().max().item()))
    assert_close_2x(gs, rgs, bgs, name="grad student", floor=1e-3 * (1 + rgs.abs().max().item()))
    if gt is not None:
        assert_close_2x(gt, rgt, bgt.to(dtype), name="grad teacher", floor=1e-3 * (1 + rgt.abs().max().item()))


def test_auto_backend_on_cpu_is_torch():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    for name in ALL:
        fn = getattr(KF, name)
        assert_close(fn(s, t, backend="auto"), fn(s, t, backend="torch"))


BAD_INPUTS = [
    (lambda s, t: ((s[0], t[0]), {}), ValueError, "student_logits must have shape"),
    (lambda s, t: ((s, t[:3]), {}), ValueError, "must agree"),
    (lambda s, t: ((s, t[:, :5]), {}), ValueError, r"same shape \[N, C\]"),
    (lambda s, t: ((s, t.to("meta")), {}), ValueError, "teacher_logits is on meta"),
    (lambda s, t: ((s.long(), t), {}), TypeError, "student_logits must be float"),
    (lambda s, t: ((s, t.int()), {}), TypeError, "teacher_logits must be float"),
    (lambda s, t: ((s[:0], t[:0]), {}), ValueError, "N >= 1"),
    (lambda s, t: ((s, t), {"temperature": 0.0}), ValueError, "temperature must be > 0"),
    (lambda s, t: ((s, t), {"temperature": "2"}), TypeError, "temperature"),
    (lambda s, t: ((s, t), {"backend": "fast"}), ValueError, "backend must be one of"),
    (lambda s, t: ((s, t), {"backend": "cuda"}), ValueError, "backend='cuda'"),
    (lambda s, t: ((s, t), {"ignore_mask": torch.zeros(3, dtype=torch.bool)}), ValueError, r"ignore_mask .*\[4\]"),
    (lambda s, t: ((s, t), {"ignore_mask": [0, 1, 0, 0]}), TypeError, "ignore_mask must be a bool tensor"),
    (
        lambda s, t: ((s, t), {"ignore_mask": torch.zeros(4, dtype=torch.bool, device="meta")}),
        ValueError,
        "ignore_mask is on meta",
    ),
]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input(name, case):
    make, exc, match = BAD_INPUTS[case]
    args, kw = make(torch.randn(4, 6), torch.randn(4, 6))
    with pytest.raises(exc, match=match):
        getattr(KF, name)(*args, **kw)


@pytest.mark.parametrize(
    "name,kwargs,exc,match",
    [(name, {"reduction": "avg"}, ValueError, "reduction must be one of") for name in DIVERGENCES]
    + [
        ("jsd_loss", {"beta": 1.5}, ValueError, "beta must be <= 1"),
        ("jsd_loss", {"beta": -0.1}, ValueError, "beta must be >= 0"),
        ("dist_loss", {"inter_weight": -1.0}, ValueError, "inter_weight must be >= 0"),
        ("dist_loss", {"intra_weight": None}, TypeError, "intra_weight"),
        ("grkd_loss", {"top_k": 0}, ValueError, "top_k must be >= 1"),
        ("grkd_loss", {"top_k": 2.0}, TypeError, "top_k must be a Python int"),
        ("dist_loss", {"reduction": "mean"}, TypeError, "reduction"),
    ],
    ids=str,
)
def test_bad_scalars(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        getattr(KF, name)(torch.randn(4, 6), torch.randn(4, 6), **kwargs)
