"""Triton SinKD kernels (kd_kernels/triton/sinkhorn_loss.py) beyond the backend matrix of
tests/test_sinkhorn.py: every regime ("fused" one-program, "split" class grids around the one-program
iterations, "grid" per-half-step launches), shapes spanning several tiles, T != 1, grad_output != 1,
teacher with and without grad, fp16/bf16 under the 2x rule, ties (sign(0) = 0), non-finite logits and
the op contract (D, U, V as torch_impl saves them).

Under TRITON_INTERPRET=1 the "interpret" config has SMALL_B = 64 and FUSED_WORK = 2^14, 32-row cost /
sign tiles, 64-wide matrix-vector tiles and 48-class spans: B = 2 (C = 3 or 1000) and (33, 3) are
"fused", (33, 100) is "split" (three class spans), B = 300 is "grid" (10 x 10 cost tiles, 5 matrix-vector
blocks). The B = 300 case keeps C = 4 so that it runs in a few seconds under the interpreter."""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels.reference import sinkhorn as R
from kd_kernels.testing import assert_close, assert_close_2x, low_precision_floor, require, tolerance, value_and_grads
from kd_kernels.torch_impl import sinkhorn as torch_impl

G = torch.tensor(0.37)  # grad_output != 1
LOSS = "sinkhorn_loss"


def _tk():
    from kd_kernels.triton import sinkhorn_loss as TK

    return TK


def _logits(b, c, dtype=torch.float32, device="cpu", scale=2.0):
    return (scale * torch.randn(b, c)).to(device=device, dtype=dtype), (scale * torch.randn(b, c)).to(device, dtype)


def _triton(**kw):
    return lambda a, b: kd_kernels.sinkhorn_loss(a, b, backend="triton", **kw)


def _check_fp32(s, t, name, **kw):
    got = value_and_grads(_triton(**kw), s, t, grad_output=G)
    want = value_and_grads(R.sinkhorn_loss, s, t, grad_output=G.double(), dtype=torch.float64, **kw)
    rtol, atol = tolerance(torch.float32, "triton")
    assert got[0].dtype == torch.float32
    for g, w, what in zip(got, want, ("value", "grad student", "grad teacher")):
        if w is None:
            assert g is None, f"{name} {what}: expected no gradient"
            continue
        assert_close(g, w, rtol=rtol, atol=max(atol, rtol / 10 * w.abs().max().item()), name=f"{name} {what}")


def _force(monkeypatch, mode):
    """Point the interpreter config at one regime for every shape used here."""
    TK = _tk()
    cfg = dict(TK._config())
    cfg.update({"fused": {"SMALL_B": 1 << 20, "FUSED_WORK": 1 << 40}, "split": {"SMALL_B": 1 << 20, "FUSED_WORK": 0},
                "grid": {"SMALL_B": 0}}[mode])  # fmt: skip
    monkeypatch.setattr(TK, "_config", lambda: cfg)
    return cfg


@pytest.mark.parametrize(
    "b, c, mode",
    [(2, 3, "fused"), (33, 3, "fused"), (2, 1000, "fused"), (33, 100, "split"), (300, 4, "grid")],
    ids=["B2-C3", "B33-C3", "B2-C1000", "B33-C100", "B300-C4-grid"],
)
@pytest.mark.parametrize("teacher_grad", [True, False], ids=["teacher-grad", "teacher-no-grad"])
def test_fp32_matches_float64_reference(b, c, mode, teacher_grad):
    s, t = _logits(b, c, device=require("triton", LOSS))
    if _tk().TRITON_INTERPRET:
        assert _tk()._mode(b, c, _tk()._config()) == mode
    t.requires_grad_(teacher_grad)
    _check_fp32(s, t, f"B={b} C={c} {mode}", temperature=1.5, epsilon=0.1, n_iters=20)


@pytest.mark.parametrize("mode", ["fused", "split", "grid"])
def test_every_regime_same_input(mode, monkeypatch):
    """One odd shape (B = 37 spans two cost tiles, C = 61 two class spans) through each regime, with
    the flags of test_sinkhorn's hard case (T = 1, eps = 0.05, 50 iterations)."""
    device = require("triton", LOSS)
    _force(monkeypatch, mode)
    assert _tk()._mode(37, 61, _tk()._config()) == mode
    s, t = _logits(37, 61, device=device)
    _check_fp32(s, t.requires_grad_(), mode, temperature=1.0, epsilon=0.05, n_iters=50)


@pytest.mark.parametrize("mode", ["fused", "split", "grid"])
def test_saved_state_matches_torch_impl(mode, monkeypatch):
    """The op contract: D, U, V as torch_impl saves them (fp32), the loss in the student's dtype."""
    device = require("triton", LOSS)
    _force(monkeypatch, mode)
    s, t = _logits(19, 23, device=device)
    got = _tk().sinkhorn_loss_fwd_triton(s, t, 2.0, 0.1, 7)
    want = torch_impl.sinkhorn_loss_fwd(s.double(), t.double(), 2.0, 0.1, 7)
    assert got[0].shape == () and got[0].dtype == torch.float32
    for g, w, what in zip(got, want, ("loss", "D", "U", "V")):
        assert g.dtype == torch.float32 and g.shape == w.shape, what
        assert_close(g, w, rtol=2e-5, atol=1e-6, name=what)


@pytest.mark.parametrize("mode", ["fused", "grid"])
def test_backward_need_flags(mode, monkeypatch):
    device = require("triton", LOSS)
    _force(monkeypatch, mode)
    TK = _tk()
    s, t = _logits(9, 5, device=device)
    _, cost, u, v = TK.sinkhorn_loss_fwd_triton(s, t, 2.0, 0.1, 4)
    gs, gt = TK.sinkhorn_loss_bwd_triton(G, s, t, cost, u, v, 2.0, 0.1, True, True)
    ws, wt = torch_impl.sinkhorn_loss_bwd(G.double(), s.double(), t.double(), cost.double(), u.double(), v.double(),
                                          2.0, 0.1, True, True)  # fmt: skip
    assert_close(gs, ws, rtol=2e-5, atol=1e-6, name="grad student")
    assert_close(gt, wt, rtol=2e-5, atol=1e-6, name="grad teacher")
    only_s = TK.sinkhorn_loss_bwd_triton(G, s, t, cost, u, v, 2.0, 0.1, True, False)
    only_t = TK.sinkhorn_loss_bwd_triton(G, s, t, cost, u, v, 2.0, 0.1, False, True)
    assert only_s[1] is None and only_t[0] is None
    assert_close(only_s[0], gs, rtol=0, atol=0, name="student only")
    assert_close(only_t[1], gt, rtol=0, atol=0, name="teacher only")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, c", [(16, 7), (33, 100)], ids=["fused", "split"])
def test_low_precision_2x_rule(dtype, b, c):
    s, t = _logits(b, c, dtype, device=require("triton", LOSS))
    t.requires_grad_(True)
    v, gs, gt = value_and_grads(_triton(), s, t, grad_output=G)
    assert v.dtype == dtype and gs.dtype == dtype and gt.dtype == dtype
    want = value_and_grads(R.sinkhorn_loss, s, t, grad_output=G.double(), dtype=torch.float64)
    base = value_and_grads(kd_kernels.sinkhorn_loss, s, t, grad_output=G)  # the PyTorch path in this dtype
    for got, w, bl, what in zip((v, gs, gt), want, base, ("value", "grad student", "grad teacher")):
        floor = 2 * low_precision_floor(dtype) * w.abs().max().item()
        assert_close_2x(got, w, bl, name=f"{dtype} {what}", floor=floor)


def test_mixed_dtypes():
    """bf16 student, fp32 teacher: each side loads its own dtype; each gradient in its input's dtype."""
    device = require("triton", LOSS)
    s = torch.randn(6, 3, device=device).to(torch.bfloat16)
    t = torch.randn(6, 3, device=device).requires_grad_(True)
    v, gs, gt = value_and_grads(_triton(), s, t)
    assert v.dtype == torch.bfloat16 and gs.dtype == torch.bfloat16 and gt.dtype == torch.float32
    _, _, rgt = value_and_grads(R.sinkhorn_loss, s, t, dtype=torch.float64)
    assert_close(gt, rgt, rtol=1e-4, atol=1e-6, name="grad teacher")


@pytest.mark.parametrize("mode", ["fused", "split", "grid"])
def test_ties_sign_zero(mode, monkeypatch):
    """Duplicated rows and student rows equal to teacher rows: D_ij = 0 exactly, sign(0) = 0."""
    device = require("triton", LOSS)
    _force(monkeypatch, mode)
    s, t = _logits(7, 6, device=device)
    s[3] = s[1]
    t[2] = s[2]
    t[5] = t[0]
    t[6] = s[6]
    _check_fp32(s, t.requires_grad_(), f"ties {mode}")
    _, cost, _, _ = _tk().sinkhorn_loss_fwd_triton(s, t.detach(), 2.0, 0.1, 3)
    assert cost[2, 2].item() == 0.0 and cost[6, 6].item() == 0.0


def test_non_contiguous(monkeypatch):
    device = require("triton", LOSS)
    s = torch.randn(11, 8, device=device).t()  # [8, 11] transposed view
    t = torch.randn(16, 11, device=device)[::2].requires_grad_(True)  # strided rows
    for mode in ("fused", "grid"):
        _force(monkeypatch, mode)
        _check_fp32(s, t, f"non-contiguous {mode}")


@pytest.mark.parametrize("mode", ["fused", "split", "grid"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])  # one -inf logit is p = 0
def test_non_finite_logits_give_non_finite_loss(mode, bad, monkeypatch):
    device = require("triton", LOSS)
    _force(monkeypatch, mode)
    for side in (0, 1):
        s, t = _logits(5, 4, device=device)
        (s, t)[side][3, 1] = bad
        t.requires_grad_(True)
        v, gs, gt = value_and_grads(_triton(), s, t)
        assert not torch.isfinite(v), f"{mode} {bad} side {side}: finite loss {v.item()}"
        assert not torch.isfinite(gs).all() and not torch.isfinite(gt).all()


def test_all_minus_inf_row_is_nan():
    """A row of -inf logits has no softmax (torch gives NaN): the loss is NaN, not finite."""
    s, t = _logits(4, 3, device=require("triton", LOSS))
    s[0] = float("-inf")
    assert torch.isnan(kd_kernels.sinkhorn_loss(s, t, backend="triton"))
