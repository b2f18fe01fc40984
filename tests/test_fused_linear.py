"""Fused-linear KD / JSD (PyTorch path) against kd_loss / jsd_loss on explicitly computed logits."""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels import functional as KF
from kd_kernels import nn as KN
from kd_kernels.testing import assert_close
from kd_kernels.torch_impl import fused_linear as fl_impl
from kd_kernels.torch_impl import logit as logit_impl

N, V, HS, HT = 10, 37, 6, 9  # V odd, Hs != Ht
LOSSES = {
    "kd": (KF.fused_linear_kd_loss, KF.kd_loss),
    "jsd": (KF.fused_linear_jsd_loss, KF.jsd_loss),
}
NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")


@pytest.fixture
def small_chunks(monkeypatch):
    """3 rows per chunk for V = 37 (chunk_rows_for reads CHUNK_ELEMENTS at each call)."""
    monkeypatch.setattr(logit_impl, "CHUNK_ELEMENTS", 3 * V)
    assert logit_impl.chunk_rows_for(V) == 3


def _inputs(dtype=torch.float64, bias=True, teacher_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((N, HS), (V, HS), (V,), (N, HT), (V, HT), (V,))
    ts = [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]
    ts[0] *= 2.0  # logits of a few units: non-trivial distributions
    ts[3] *= 2.0
    if not bias:
        ts[2] = ts[5] = None
    for i, t in enumerate(ts):
        if t is not None and (i < 3 or teacher_grad):
            t.requires_grad_(True)
    return ts


def _fused(loss, ts, **kw):
    hs, ws, bs, ht, wt, bt = ts
    return LOSSES[loss][0](hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, **kw)


def _explicit(loss, ts, **kw):
    """The plain loss on logits computed explicitly ([N, V] materialised), autograd through the matmul."""
    hs, ws, bs, ht, wt, bt = ts
    zs = hs @ ws.t() + (0 if bs is None else bs)
    zt = ht @ wt.t() + (0 if bt is None else bt)
    return LOSSES[loss][1](zs, zt, backend="torch", **kw)


def _grads(out, ts, grad_output):
    wrt = [t for t in ts if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wrt, grad_output)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_matches_explicit_logits_float64(small_chunks, loss, bias, masked, teacher_grad):
    ts = _inputs(bias=bias, teacher_grad=teacher_grad)
    kw = {"temperature": 2.5}
    if loss == "jsd":
        kw["beta"] = 0.3
    if masked:
        kw["ignore_mask"] = torch.tensor([i % 3 == 1 for i in range(N)])
    out, ref = _fused(loss, ts, **kw), _explicit(loss, ts, **kw)
    assert_close(out, ref, rtol=1e-12, atol=1e-13, name=f"{loss} value")
    grad_output = torch.tensor(0.7, dtype=torch.float64)  # != 1
    got, want = _grads(out, ts, grad_output), _grads(ref, ts, grad_output)
    names = [n for n, t in zip(NAMES, ts, strict=True) if t is not None and t.requires_grad]
    assert len(got) == len(names) == (6 if bias else 4) - (0 if teacher_grad else (3 if bias else 2))
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert b.abs().max() > 0, f"{name}: reference gradient is zero (test would be vacuous)"
        assert_close(a, b, rtol=1e-10, atol=1e-12, name=f"{loss} grad {name}")


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_and_row_weights(small_chunks, loss, reduction):
    ts = _inputs()
    mask = torch.zeros(N, dtype=torch.bool)
    mask[[0, 4]] = True
    kw = {"reduction": reduction, "ignore_mask": mask, "temperature": 1.5}
    out, ref = _fused(loss, ts, **kw), _explicit(loss, ts, **kw)
    assert out.shape == ref.shape
    assert_close(out, ref, rtol=1e-12, atol=1e-13, name=f"{loss} {reduction}")
    grad_output = torch.linspace(-1.0, 2.0, N, dtype=torch.float64) if reduction == "none" else None
    grad_output = torch.tensor(-1.3, dtype=torch.float64) if grad_output is None else grad_output
    for a, b in zip(_grads(out, ts, grad_output), _grads(ref, ts, grad_output), strict=True):
        assert_close(a, b, rtol=1e-10, atol=1e-12, name=f"{loss} {reduction} grad")
    if reduction == "none":
        assert (out[mask] == 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_beta_endpoints(small_chunks, beta):
    ts = _inputs()
    out, ref = _fused("jsd", ts, beta=beta), _explicit("jsd", ts, beta=beta)
    assert_close(out, ref, rtol=1e-12, atol=1e-13, name=f"jsd beta={beta}")
    for a, b in zip(_grads(out, ts, None), _grads(ref, ts, None), strict=True):
        assert_close(a, b, rtol=1e-10, atol=1e-12, name=f"jsd beta={beta} grad")


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_all_rows_masked_gives_zero(small_chunks, loss):
    ts = _inputs()
    out = _fused(loss, ts, ignore_mask=torch.ones(N, dtype=torch.bool))
    assert out.item() == 0.0
    for g in _grads(out, ts, None):
        assert (g == 0).all()


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_float32_against_float64(small_chunks, loss):
    ts64 = _inputs(teacher_grad=True)
    ts32 = [None if t is None else t.detach().float().requires_grad_(True) for t in ts64]
    out32, ref = _fused(loss, ts32, temperature=2.0), _explicit(loss, ts64, temperature=2.0)
    assert out32.dtype == torch.float32
    assert_close(out32.double(), ref, rtol=1e-5, atol=1e-6, name=f"{loss} fp32 value")
    for a, b in zip(_grads(out32, ts32, None), _grads(ref, ts64, None), strict=True):
        assert a.dtype == torch.float32
        assert_close(a.double(), b, rtol=1e-4, atol=1e-5, name=f"{loss} fp32 grad")


@pytest.mark.parametrize("kind", ["kd", "jsd"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
def test_torch_impl_chunk_rows(kind, chunk_rows):
    """The torch_impl functions with forced chunks equal divergence_fwd/bwd on the full logits."""
    hs, ws, bs, ht, wt, bt = (t.detach() for t in _inputs(seed=1))
    mask = torch.tensor([i == 2 for i in range(N)])
    temperature, beta = 3.0, 0.4
    zs, zt = hs @ ws.t() + bs, ht @ wt.t() + bt
    want = logit_impl.divergence_fwd(kind, zs, zt, temperature, beta, mask)
    got = fl_impl.fused_linear_fwd(kind, hs, ws, bs, ht, wt, bt, temperature, beta, mask, chunk_rows=chunk_rows)
    for a, b, name in zip(got, want, ("row_loss", "lse_s", "lse_t"), strict=True):
        assert_close(a, b, rtol=1e-12, atol=1e-13, name=name)
    grad_row = torch.randn(N, dtype=torch.float64)
    gzs, gzt = logit_impl.divergence_bwd(kind, grad_row, zs, zt, want[1], want[2], temperature, beta, mask, True, True)
    out = fl_impl.fused_linear_bwd(
        kind, grad_row, hs, ws, bs, ht, wt, bt, got[1], got[2], temperature, beta, mask, (True,) * 6,
        chunk_rows=chunk_rows,
    )  # fmt: skip
    expected = (gzs @ ws, gzs.t() @ hs, gzs.sum(0), gzt @ wt, gzt.t() @ ht, gzt.sum(0))
    for name, a, b in zip(NAMES, out, expected, strict=True):
        assert_close(a, b, rtol=1e-10, atol=1e-12, name=name)
    # only what is needed is computed: the rest are empty
    out = fl_impl.fused_linear_bwd(
        kind, grad_row, hs, ws, bs, ht, wt, bt, got[1], got[2], temperature, beta, mask,
        (False, True, False, False, False, False), chunk_rows=chunk_rows,
    )  # fmt: skip
    assert [o.numel() for o in out] == [0, V * HS, 0, 0, 0, 0]
    assert_close(out[1], expected[1], rtol=1e-10, atol=1e-12, name="weight only")


def test_logits_are_only_formed_per_chunk(small_chunks, monkeypatch):
    """No [N, V] logits: every head GEMM of the forward and backward covers at most a chunk of rows."""
    rows_seen = []
    real = fl_impl.logits

    def spy(hidden, weight, bias):
        rows_seen.append(hidden.shape[0])
        return real(hidden, weight, bias)

    monkeypatch.setattr(fl_impl, "logits", spy)
    ts = _inputs()
    out = _fused("kd", ts)
    n_fwd = len(rows_seen)
    _grads(out, ts, None)
    assert n_fwd == 2 * 4  # ceil(10 / 3) chunks x (student, teacher)
    assert len(rows_seen) == 2 * n_fwd  # the backward recomputes both sides per chunk
    assert max(rows_seen) == 3


def test_teacher_gets_no_gradient_when_detached():
    ts = _inputs()
    ts[3].requires_grad_(False)
    out = _fused("kd", ts)
    out.backward()
    assert ts[0].grad is not None and ts[1].grad is not None and ts[2].grad is not None
    assert all(t.grad is None for t in ts[3:])


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_torch_compile_fullgraph(loss):
    torch._dynamo.reset()
    ts = [t.detach().float() for t in _inputs()]
    for t in ts[:3]:
        t.requires_grad_(True)
    mask = torch.tensor([i == 5 for i in range(N)])
    fn = LOSSES[loss][0]

    def f(hs, ws, bs, ht, wt, bt, mask):
        return fn(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, temperature=2.0, ignore_mask=mask)

    eager = f(*ts, mask)
    g_eager = torch.autograd.grad(eager, ts[:3])
    compiled = torch.compile(f, fullgraph=True)(*ts, mask)
    g_comp = torch.autograd.grad(compiled, ts[:3])
    assert_close(compiled, eager, rtol=1e-5, atol=1e-6, name=f"{loss} compiled value")
    for a, b in zip(g_comp, g_eager, strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-6, name=f"{loss} compiled grad")


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_module_equals_function(loss):
    ts = _inputs()
    cls = {"kd": KN.FusedLinearKDLoss, "jsd": KN.FusedLinearJSDLoss}[loss]
    mask = torch.tensor([i == 0 for i in range(N)])
    crit = cls(temperature=1.7, reduction="sum")
    hs, ws, bs, ht, wt, bt = ts
    m = crit(hs, ws, ht, wt, bs, bt, mask)
    f = _fused(loss, ts, temperature=1.7, reduction="sum", ignore_mask=mask)
    assert_close(m, f, rtol=1e-13, atol=1e-14, name=loss)
    crit.temperature = 3.0  # live attribute
    assert not torch.allclose(crit(hs, ws, ht, wt, bs, bt, mask), m)
    with pytest.raises(ValueError, match="temperature"):
        cls(temperature=-1.0)
    assert kd_kernels.FusedLinearKDLoss is KN.FusedLinearKDLoss


BAD = [
    ("student_weight", lambda ts: ts.__setitem__(1, torch.randn(V, HS + 1, dtype=torch.float64)), "student_weight"),
    ("teacher_weight", lambda ts: ts.__setitem__(4, torch.randn(V + 1, HT, dtype=torch.float64)), "teacher_weight"),
    ("teacher_hidden", lambda ts: ts.__setitem__(3, torch.randn(N + 1, HT, dtype=torch.float64)), "teacher_hidden"),
    ("student_bias", lambda ts: ts.__setitem__(2, torch.randn(V - 1, dtype=torch.float64)), "student_bias"),
    ("student_hidden", lambda ts: ts.__setitem__(0, torch.randn(N, HS, 2, dtype=torch.float64)), "student_hidden"),
    ("dtype", lambda ts: ts.__setitem__(4, torch.randn(V, HT)), "teacher_weight"),
]


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_validation_names_the_argument(loss, case):
    ts = [None if t is None else t.detach() for t in _inputs()]
    _, corrupt, name = case
    corrupt(ts)
    with pytest.raises((ValueError, TypeError), match=f"fused_linear_{loss}_loss: .*{name}"):
        _fused(loss, ts)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_bad_keywords(loss):
    ts = [t.detach() for t in _inputs()]
    with pytest.raises(ValueError, match="reduction"):
        _fused(loss, ts, reduction="avg")
    with pytest.raises(ValueError, match="ignore_mask"):
        _fused(loss, ts, ignore_mask=torch.zeros(N + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        _fused(loss, ts, backend="gpu")  # not a backend name
